"""The Snakemake workflow on the real slides: per-slide maps and reports, and the cohort CSV."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import openslide
import pytest
from onnx_models import colour_rule_model, contract

from wsiseg.contract import to_metadata

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("snakemake") is None,
                       reason="snakemake is not installed (pip install snakemake)"),
]


def snakemake(*flags: str, config: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the workflow with this venv's snakemake and wsiseg; ``config`` is KEY=VALUE items."""
    bindir = str(Path(sys.executable).parent)
    exe = shutil.which("snakemake", path=bindir) or "snakemake"
    wsiseg = shutil.which("wsiseg", path=bindir) or "wsiseg"
    return subprocess.run([exe, "-s", str(SNAKEFILE), "--configfile",
                           str(REPO / "workflow" / "config.yaml"), "--cores", "1",
                           "--directory", str(cwd), *flags, "--config", f"wsiseg={wsiseg}",
                           *config], capture_output=True, text=True, timeout=600)


def test_workflow_on_the_shared_slides(slides_dir, tmp_path):
    model = colour_rule_model(tmp_path / "m.onnx", meta=to_metadata(
        contract(mpp=1.0, tile_px=256, border_px=16, size_multiple=16)))
    out = tmp_path / "out"
    config = [f"slides={slides_dir}", f"out={out}", f"model={model}", "threads=1"]
    r = snakemake(config=config, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    slides = sorted(p.name for p in slides_dir.glob("*.svs"))
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["slide"] for row in rows] == slides  # one row per slide
    by = {row["slide"]: row for row in rows}
    assert {"tumour mm2", "stroma mm2", "tsr_whole_pct", "tsr_reason"} <= set(rows[0])
    assert float(by["tcga-cr-7395-01a-01-ts1.svs"]["mpp"]) == pytest.approx(1.0, rel=0.01)
    report = json.loads((out / "tcga-cr-7395-01a-01-ts1.json").read_text())
    assert report["slide"]["mpp_source"] == "override" and report["slide"]["mpp"] == 0.5
    cmu = by["CMU-1-Small-Region.svs"]
    assert float(cmu["tumour mm2"]) > 0 and float(cmu["stroma mm2"]) > 0
    report = json.loads((out / "CMU-1-Small-Region.json").read_text())
    assert float(cmu["stroma mm2"]) == pytest.approx(report["class_area_mm2"]["stroma"], abs=1e-4)
    with openslide.OpenSlide(str(out / "CMU-1-Small-Region.tif")) as osr:
        w, h = osr.dimensions
        assert (w, h) == (2220 // 2, 2967 // 2)  # 2 x 2 means: 0.998 um/px
    # Up to date: a second run does nothing.
    again = snakemake(config=config, cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_workflow_rejects_an_unknown_mpp_override(slides_dir, tmp_path):
    r = snakemake("-n", config=[f"slides={slides_dir}", f"out={tmp_path}/o",
                                "mpp={nosuch.svs: 0.5}"], cwd=tmp_path)
    assert r.returncode != 0
    assert "config 'mpp' names slides not in the folder: nosuch.svs" in r.stdout + r.stderr
