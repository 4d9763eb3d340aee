"""Quality control: confidence tally, stain distance, warnings in the report, preview and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_models import colour_rule_model, contract
from synth import make_slide, make_tissue_rgb

from wsiseg.cli import main
from wsiseg.contract import from_metadata, to_metadata
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.qc import (
    Calibration,
    ConfidenceTally,
    qc_section,
    stain_distance,
    stain_lab,
    warning_line,
)

CAL = {"confidence_threshold": 0.6, "low_confidence_val": 0.05, "low_confidence_warn": 0.2,
       "stain_mean": [44.0, 38.0, -42.0], "stain_std": [5.0, 11.0, 13.0], "stain_warn": 3.0}


def test_tally_counts_tissue_pixels_only():
    t = ConfidenceTally()
    # top probabilities x 255: 0.5 (a tie of two classes), 1.0, and 0.2 on background
    top = np.array([[128, 255, 51]], np.uint8)
    labels = np.array([[1, 1, 2]], np.uint8)  # value 2 = background: not counted
    t.add(top, labels, background=2)
    assert t.hist.sum() == 2
    assert t.share_below(0.6) == pytest.approx(0.5)
    assert t.share_below(128 / 255) == 0.0  # below, not at
    assert t.share_below(129 / 255) == pytest.approx(0.5)
    assert math.isnan(ConfidenceTally().share_below(0.5))


def test_stain_lab_ignores_white_and_masked_pixels():
    rgb = np.full((8, 8, 3), 255, np.uint8)
    rgb[:4] = (120, 40, 160)  # purple
    mean = stain_lab(rgb)
    assert mean is not None and mean[2] < -30  # blue-purple: negative b*
    assert stain_lab(rgb, np.zeros((8, 8), bool)) is None
    assert stain_lab(np.full((8, 8, 3), 255, np.uint8)) is None


def test_warnings_name_what_is_off():
    cal = Calibration.from_contract(CAL)
    tally = ConfidenceTally()
    tally.hist[25] = 50   # half the tissue at p ~ 0.1: low confidence
    tally.hist[255] = 50
    near = qc_section(CAL, None, (44.0, 38.0, -42.0))
    assert near["warnings"] == [] and near["stain_distance"] == 0.0
    far = qc_section(CAL, tally, (55.0, 25.0, -5.0))
    assert stain_distance((55.0, 25.0, -5.0), cal) > 3.0
    assert len(far["warnings"]) == 2
    assert "low model confidence on 50%" in far["warnings"][0]
    assert "stain colour far" in far["warnings"][1]
    line = warning_line(far)
    assert line is not None and "\n" not in line
    uncalibrated = qc_section({}, tally, (55.0, 25.0, -5.0))
    assert uncalibrated["calibrated"] is False and uncalibrated["warnings"] == []


def test_malformed_calibration_is_refused():
    with pytest.raises(ValueError, match="calibrate-qc"):
        Calibration.from_contract({"stain_warn": 1.0})


def test_contract_carries_qc():
    c = contract(qc=CAL)
    assert from_metadata(to_metadata(c)).qc == CAL
    assert "wsiseg.qc" not in to_metadata(contract())


@pytest.fixture(scope="module")
def purple_slide(tmp_path_factory) -> Path:
    rgb, _ = make_tissue_rgb(200, 240, np.random.default_rng(3), n_blobs=3)
    path = tmp_path_factory.mktemp("qc") / "slide.tif"
    make_slide(path, rgb, mpp=2.0, levels=2, tile_px=128)
    return path


def _model(folder: Path, qc: dict) -> Path:
    return colour_rule_model(folder / "m.onnx", meta=to_metadata(contract(qc=qc)))


def test_report_map_and_cli_carry_the_qc_block(purple_slide, tmp_path):
    # a stain reference far from the synthetic slide's colours: the run must warn
    far = {**CAL, "stain_mean": [90.0, -40.0, 60.0], "stain_std": [1.0, 1.0, 1.0]}
    model = _model(tmp_path, far)
    out = tmp_path / "out" / "map.tif"
    result = CliRunner().invoke(main, ["segment", str(purple_slide), "-o", str(out),
                                       "--model", str(model), "--tile-px", "64",
                                       "--no-tissue-mask"])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "stain colour far" in warnings[0]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["qc"]["calibrated"] and report["qc"]["stain_distance"] > 3
    from wsiseg.writer import read_description
    assert read_description(out)["qc"]["warnings"] == report["qc"]["warnings"]


def test_no_warning_when_the_slide_matches(purple_slide, tmp_path):
    rgb_mean = stain_lab(make_tissue_rgb(200, 240, np.random.default_rng(3), n_blobs=3)[0])
    near = {**CAL, "stain_mean": list(rgb_mean), "stain_std": [20.0, 20.0, 20.0],
            "low_confidence_warn": 1.0}
    report = segment_slide(purple_slide, tmp_path / "map.tif", model=_model(tmp_path, near),
                           options=SegmentOptions(tile_px=64, tissue=None), analysis=None)
    assert report["qc"]["warnings"] == []
    assert 0.0 <= report["qc"]["low_confidence_share"] <= 1.0


@pytest.mark.slow
def test_default_model_qc_on_real_slides(slides_dir, tmp_path):
    """The shipped model warns on CMU-1 (skin, another stain) and not on the colorectal demo."""
    demo = Path(__file__).resolve().parents[1] / "examples" / "ebhi-val-mosaic.tif"
    opts = SegmentOptions()
    cmu = segment_slide(slides_dir / "CMU-1-Small-Region.svs", tmp_path / "cmu.tif",
                        model=_default_model(), options=opts, analysis=None)
    ok = segment_slide(demo, tmp_path / "demo.tif", model=_default_model(), options=opts,
                       analysis=None)
    assert cmu["qc"]["calibrated"] and ok["qc"]["calibrated"]
    assert cmu["qc"]["warnings"], cmu["qc"]
    assert ok["qc"]["warnings"] == [], ok["qc"]


def _default_model() -> Path:
    from wsiseg.cli import default_model
    return default_model()
