"""A short real run on EBHI-Seg pairs: loss goes down, export, contract, ORT parity, evaluate."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from train_helpers import EBHI_INDEX  # noqa: E402
from wsiseg_train.checkpoint import load as load_checkpoint  # noqa: E402
from wsiseg_train.cli import main  # noqa: E402
from wsiseg_train.model import model_from_checkpoint  # noqa: E402

from wsiseg.contract import from_metadata  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "ebhi-seg.toml"
NARROW = ["model.width=8", "model.depth=3", "model.border_px=8", "data.patch_px=64",
          "data.jitter_px=16", "data.val_patches=8", "data.sets.limit=8",
          f'data.sets.index="{EBHI_INDEX.as_posix()}"', "train.lr=1e-3", "train.epochs=3",
          "train.iterations=8", "train.batch_size=4", "train.threads=1", "train.seed=3",
          # flips and 90-degree turns only: 24 iterations are too few to learn through warps
          "augment.rotate=false", "augment.elastic=false", "augment.hed=false",
          "augment.hsv=false"]


def _overrides(keys):
    return [a for k in keys for a in ("--set", k)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not EBHI_INDEX.is_file():
        pytest.skip(f"EBHI-Seg subset not found at {EBHI_INDEX} (shared data beside the checkout)")
    out = tmp_path_factory.mktemp("ebhi") / "run"
    result = CliRunner().invoke(main, ["train", str(CONFIG), "-o", str(out), *_overrides(NARROW)])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.slow
def test_loss_decreases_and_outputs_exist(run):
    out, summary = run
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) == 3 and summary["epochs"] == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(np.isfinite(h["val_loss"]) for h in history)
    assert (out / "model.onnx").is_file() and (out / "plot.png").is_file()


@pytest.mark.slow
def test_exported_model_matches_torch_and_carries_the_contract(run):
    out, _ = run
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    contract = from_metadata(session.get_modelmeta().custom_metadata_map)
    assert contract.class_names == ["tumour", "healthy glands", "other"]
    # the border is the measured context (not the config's 8), recorded with its curve
    context = contract.training["context"]
    assert contract.size_multiple == 4 and contract.border_px == context["context_px"] > 0
    assert contract.tile_px == max(64, -(-(2 * contract.border_px + 4) // 4) * 4)
    assert context["tissue"] == "ebhi-val-mosaic.tif" and len(context["curve"]) >= 2
    assert contract.input == "uint8" and contract.tumour_classes == ("tumour",)
    # the exported weights are those of the best epoch
    assert contract.training["iterations"] == 8 * contract.training["best_epoch"]
    assert contract.training["epochs"] == contract.training["best_epoch"]
    assert 0 <= contract.training["val_dice"] <= 1
    assert contract.training["sets"][0]["source"] == "index.csv"
    _, model = model_from_checkpoint(load_checkpoint(out / "best.pt"))
    model.eval()
    x = np.random.default_rng(0).integers(0, 256, size=(3, 3, 96, 72), dtype=np.uint8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"image": x})[0]
    assert got.shape == (3, 3, 96, 72)
    assert np.abs(got - ref).max() < 1e-3


@pytest.mark.slow
def test_export_and_evaluate_commands(run, tmp_path):
    out, _ = run
    result = CliRunner().invoke(main, ["export", str(out), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-3 and report["opset"] == 18
    result = CliRunner().invoke(main, ["export", str(out), "-o", str(tmp_path / "fixed.onnx"),
                                       "--no-context"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["border_px"] == 8  # the config's
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "m.onnx"), str(CONFIG),
                                       "--split", "val", *_overrides(NARROW[6:8])])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["images"] == 8 and set(scores["dice"]) == {"tumour", "healthy glands", "other"}
    assert 0.0 <= scores["overall_dice"] <= 1.0
    # the same weights twice (two borders): every difference 0, A's Dice those of evaluate
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"),
                                       str(tmp_path / "fixed.onnx"), str(CONFIG), "--split", "val",
                                       "--resamples", "50", *_overrides(NARROW[6:8])])
    assert result.exit_code == 0, result.output
    compared = json.loads(result.output.strip().splitlines()[-1])
    rows = {r["class"]: r for r in compared["rows"]}
    assert compared["images"] == 8 and rows["overall"]["a"] == scores["overall_dice"]
    assert all(r["diff"] == 0.0 and r["low"] == r["high"] == 0.0 for r in compared["rows"]
               if r["a"] == r["a"])            # (NaN rows: a class absent from the crops)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "m.onnx"),
                                       str(tmp_path / "missing.onnx"), str(CONFIG)])
    assert result.exit_code == 2 and "not found" in result.output
