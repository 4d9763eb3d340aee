"""The demo slides in examples/: the colorectal mosaic is rebuilt byte for byte from the shared
EBHI-Seg data, and the default model labels its crops the way their class says."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiseg.cli import main
from wsiseg.writer import read_level

ROOT = Path(__file__).resolve().parents[1]
MOSAIC = ROOT / "examples" / "ebhi-val-mosaic.tif"
BUILD = ROOT / "examples" / "make_colorectal_demo.py"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mosaic_is_documented_with_its_checksum():
    assert MOSAIC.is_file() and MOSAIC.stat().st_size < 5 * 2 ** 20
    assert _sha256(MOSAIC) in (ROOT / "examples" / "README.md").read_text()


def test_mosaic_rebuilds_identically(shared_data, tmp_path):
    out = tmp_path / "mosaic.tif"
    r = subprocess.run([sys.executable, str(BUILD), "--data", str(shared_data / "ebhi-seg"),
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _sha256(out) == _sha256(MOSAIC)


def _crop_boxes():
    """(row, col, class) of each crop in the mosaic, from the build script's layout."""
    sys.path.insert(0, str(BUILD.parent))
    try:
        import make_colorectal_demo as demo
    finally:
        sys.path.pop(0)
    classes = [c for c, n in demo.PER_CLASS.items() for _ in range(n)]
    boxes = []
    for i, cls in enumerate(classes):
        r, c = divmod(i, demo.COLS)
        boxes.append((demo.GAP_PX + r * (224 + demo.GAP_PX),
                      demo.GAP_PX + c * (224 + demo.GAP_PX), cls))
    return boxes


@pytest.mark.slow
def test_default_model_on_the_mosaic(tmp_path):
    """No --model: tumour crops come out mostly tumour + desmoplastic stroma, normal mucosa
    crops mostly healthy glands + lamina propria, the glass between them background."""
    out = tmp_path / "demo.tif"
    r = CliRunner().invoke(main, ["-q", "segment", str(MOSAIC), "-o", str(out)])
    assert r.exit_code == 0, r.output
    labels = read_level(out, level=0)
    report = json.loads(out.with_suffix(".json").read_text())
    value = {c["name"]: i + 1 for i, c in enumerate(report["model"]["classes"])}
    cancer = {value["tumour"], value["desmoplastic stroma"]}
    normal = {value["healthy glands"], value["lamina propria stroma"]}
    right = []
    for row, col, cls in _crop_boxes():
        crop = labels[row + 16:row + 208, col + 16:col + 208]   # inner part of the crop
        mine, other = (cancer, normal) if cls == "Adenocarcinoma" else (normal, cancer)
        right.append(np.isin(crop, list(mine)).mean() > np.isin(crop, list(other)).mean())
    print(f"{sum(right)} of {len(right)} crops right")
    assert np.mean(right) >= 0.9, right
    gap = labels[:12, :]                                          # glass above the first row
    assert (gap == value["background"]).mean() > 0.9
