"""The GPU path, exercised on the CPU: labels decided in the graph (uint8 outputs through I/O
binding) must equal the host's decision; reader vs model throughput; the GPU check's dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_models import colour_rule_labels, colour_rule_model

from wsiseg.engine import ModelError, choose_head, load_model
from wsiseg.pipeline import default_workers, throughput
from wsiseg.tiling import tile_grid

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wsiseg-ebhi-unet.onnx"


def test_auto_head_is_graph_on_a_gpu_only():
    assert choose_head("auto", ["CPUExecutionProvider"]) == "host"
    assert choose_head("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "graph"
    with pytest.raises(ValueError, match="head must be one of"):
        choose_head("device", ["CPUExecutionProvider"])


def test_graph_head_equals_host_on_colour_rule(tmp_path):
    path = colour_rule_model(tmp_path / "c.onnx")
    host, graph = load_model(path, device="cpu"), load_model(path, device="cpu", head="graph")
    assert (host.head, graph.head) == ("host", "graph")
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    labels_h, top_h, scores_h = host.predict(tiles, probabilities=True)
    labels_g, top_g, scores_g = graph.predict(tiles, probabilities=True)
    assert labels_g.dtype == top_g.dtype == scores_g.dtype == np.uint8
    assert labels_g.shape == top_g.shape == (2, 64, 64) and scores_g.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(labels_g + 1, colour_rule_labels(tiles))
    np.testing.assert_array_equal(labels_g, labels_h)
    assert np.abs(scores_g.astype(int) - scores_h).max() <= 1
    assert np.abs(top_g.astype(int) - top_h).max() <= 1
    # the top probability is the largest class probability
    assert np.abs(scores_h.max(axis=1).astype(int) - top_h).max() <= 1
    only, top, none = graph.predict(tiles)
    assert none is None
    np.testing.assert_array_equal(only, labels_h)
    assert np.abs(top.astype(int) - top_h).max() <= 1


@pytest.mark.slow
def test_graph_head_equals_host_on_the_shipped_model():
    host = load_model(SHIPPED, device="cpu")
    graph = load_model(SHIPPED, device="cpu", head="graph")
    rng = np.random.default_rng(1)
    tiles = rng.integers(90, 230, (2, 128, 128, 3), dtype=np.uint8)
    (lh, th, sh), (lg, tg, sg) = host.predict(tiles, probabilities=True), graph.predict(
        tiles, probabilities=True)
    assert (lh == lg).mean() > 0.999  # ties may break differently, nothing else
    assert np.abs(sg.astype(int) - sh).max() <= 1
    assert np.abs(tg.astype(int) - th).max() <= 1


def test_graph_head_without_onnx_says_how_to_get_it(tmp_path, monkeypatch):
    from wsiseg import graph

    path = colour_rule_model(tmp_path / "c.onnx")
    monkeypatch.setattr(graph, "available", lambda: False)
    with pytest.raises(ModelError, match=r"pip install 'wsiseg\[gpu\]'"):
        load_model(path, device="cpu", head="graph")
    assert load_model(path, device="cpu").head == "host"


def test_throughput_names_the_bound():
    tiles = tile_grid((2000, 5000), tile_px=1000, border_px=0)  # 10 Mpx computed in all
    fast_reader = throughput(tiles, read_s=1.0, model_s=10.0, workers=2)
    assert fast_reader["bound_by"] == "model"
    assert fast_reader["reader_mpx_per_s"] == pytest.approx(20.0)
    assert fast_reader["model_mpx_per_s"] == pytest.approx(1.0)
    assert throughput(tiles, read_s=30.0, model_s=1.0, workers=2)["bound_by"] == "reader"


def test_default_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_workers() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_workers() == 2


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check script's CPU mode: every step runs at small sizes and prints the table."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for row in ("agreement fp32 demo", "agreement fp16 demo", "synthetic end-to-end",
                "synthetic model-only", "train smoke"):
        assert row in done.stdout, done.stdout[-2000:]
    assert "FAIL" not in done.stdout
