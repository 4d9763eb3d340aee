"""Out-of-distribution evaluation through the engine (training/ood.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from wsiseg_train.cli import main
from wsiseg_train.ood import (
    NON_TUMOUR_TISSUE,
    Box,
    Crop,
    crop_scores,
    lay_out,
    majority,
    markdown,
    rows,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["tumour", "desmoplastic stroma", "lamina propria stroma", "healthy glands",
         "background"]


def test_lay_out_places_each_image_apart_on_glass():
    images = [np.full((10, 12, 3), i * 40, np.uint8) for i in range(1, 6)]
    canvas, boxes = lay_out(images, gap_px=4)
    assert len(boxes) == 5
    for i, b in enumerate(boxes):
        assert (canvas[b.row:b.row + b.h, b.col:b.col + b.w] == (i + 1) * 40).all()
    covered = np.zeros(canvas.shape[:2], bool)
    for b in boxes:
        covered[b.row - 4:b.row + b.h + 4, b.col - 4:b.col + b.w + 4] = True
    assert covered.sum() < canvas.shape[0] * canvas.shape[1]   # glass between the images
    assert Box(10, 20, 30, 40).scaled(2.0) == (slice(5, 20), slice(10, 30))


def test_crop_scores_exact():
    labels = np.zeros((4, 4), np.uint8)
    labels[:2] = 1            # reference tumour (top half)
    labels[2:] = 2            # reference desmoplastic stroma (bottom half)
    glands = labels == 1
    crop = Crop("c", "Adenocarcinoma", np.zeros((4, 4, 3), np.uint8), glands, labels)
    pred = labels.copy()
    pred[3, :2] = 1           # two stroma pixels called tumour
    s = crop_scores([crop], [pred], NAMES)
    assert s["dice"]["tumour"] == pytest.approx(2 * 8 / (2 * 8 + 2))
    assert s["dice"]["desmoplastic stroma"] == pytest.approx(2 * 6 / (2 * 6 + 2))
    assert math.isnan(s["dice"]["healthy glands"])
    assert s["epithelium_dice"] == pytest.approx(2 * 8 / (10 + 8))
    assert s["stroma_called_tumour"] == pytest.approx(2 / 8)
    assert majority(np.array([1, 2, 2, 5]), 5) == 2


@pytest.mark.slow
def test_evaluate_ood_command_on_real_data(shared_data, tmp_path):
    model = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
    out = tmp_path / "ood.md"
    r = CliRunner().invoke(main, ["evaluate-ood", str(model), "--data", str(shared_data),
                                  "--limit", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.with_suffix(".json").read_text())[0]
    k = result["kather2016"]
    assert k["non_tumour_tiles"] == 15 and k["stroma_tiles"] == 3
    assert sum(sum(v.values()) for v in k["confusion"].values()) == 24
    assert sum(k["confusion"]["08_EMPTY"].values()) == 3
    assert k["confusion"]["08_EMPTY"].get("background", 0) >= 2   # glass-like tiles
    assert result["ebhi_val"]["crops"] == 4 and result["ebhi_lesion_val"]["crops"] == 4
    assert 0.5 < result["ebhi_val"]["epithelium_dice"] <= 1
    assert result["windows"]["windows"] == 8
    assert out.read_text() == markdown([result]) and len(rows(result)) >= 15
    kc = result["kather2016_context"]
    assert kc["context"] and not k["context"] and kc["non_tumour_tiles"] == 15
    assert sum(sum(v.values()) for v in kc["confusion"].values()) == 24
    assert "| Kather 2016 in context: non-tumour tissue tiles called tumour |" in r.stdout
    assert "| Kather 2016: non-tumour tissue tiles called tumour |" in r.stdout
    assert k["mpp"] == pytest.approx(0.495)
    assert [t["call"] for t in k["tiles"] if t["type"] == "08_EMPTY"].count("background") >= 2
    assert all(t["shares"][t["call"]] == max(t["shares"].values()) for t in k["tiles"])
    called = [t for t in k["tiles"] if t["type"] in NON_TUMOUR_TISSUE and t["call"] == "tumour"]
    assert len(called) == k["non_tumour_called_tumour"]
    if called:   # the table names them with their shares
        assert f"{called[0]['type']} tumour {called[0]['shares']['tumour']:.2f}" in \
            out.read_text()


@pytest.mark.slow
def test_kather_mosaic_can_declare_another_spacing(shared_data, tmp_path):
    from skimage.io import imread
    from wsiseg_train.ood import KATHER_TYPES, kather_calls

    from wsiseg.engine import load_model
    model = load_model(ROOT / "models" / "wsiseg-ebhi-unet.onnx", device="cpu")
    folder = shared_data / "kather-samples" / "labelled-2016"
    types, calls, labels, shares = kather_calls(model, folder, tmp_path, mpp=0.7)
    assert len(types) == len(calls) == len(shares) == 24
    # each call is the class with the largest share of its tile's centre
    assert all(max(sh, key=sh.get) == c and sum(sh.values()) == pytest.approx(1)
               for c, sh in zip(calls, shares))
    tiles = [imread(p)[..., :3] for t in KATHER_TYPES for p in sorted((folder / t).glob("*.tif"))]
    slide, _ = lay_out(tiles, gap_px=tiles[0].shape[0])
    # the map is at the model's 1 um/px: 0.7 of the slide when it declares 0.7 um/px
    # (at the tiles' own 0.495 it is half as large)
    assert labels.shape[0] == pytest.approx(slide.shape[0] * 0.7, abs=3)
    result = {"kather2016": {"mpp": 0.99, "non_tumour_called_tumour": 1, "non_tumour_tiles": 15,
                             "stroma_called_stroma": 2, "stroma_tiles": 3,
                             "tumour_called_tumour": 3, "tumour_tiles": 3}, **_other_figures()}
    assert rows(result)[0][0] == ("Kather 2016 (laid out at 0.99 µm/px): non-tumour tissue tiles "
                                  "called tumour")


def test_kather_in_context_calls_the_tile_itself_inside_its_mirror(tmp_path):
    """In context each tile is mirrored out to 3x its side: the call is made over the centre
    of the tile itself (here blue, tumour to the colour rule), not of the mirrored block,
    whose centre half would take in the tile's pink rim (stroma) and its mirror images."""
    import tifffile
    from onnx_models import colour_rule_model
    from wsiseg_train.ood import KATHER_TYPES, kather_calls

    from wsiseg.engine import load_model
    tile = np.full((150, 150, 3), (230, 60, 90), np.uint8)      # pink rim: stroma
    tile[25:125, 25:125] = (40, 40, 220)                         # blue centre: tumour
    for t in KATHER_TYPES:
        (tmp_path / "tiles" / t).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "tiles" / t / "a.tif", tile)
    model = load_model(colour_rule_model(tmp_path / "m.onnx"), device="cpu")
    work = tmp_path / "work"
    work.mkdir()
    _, calls, alone, shares = kather_calls(model, tmp_path / "tiles", work, mpp=0.5)
    _, calls_c, ctx, shares_c = kather_calls(model, tmp_path / "tiles", work, mpp=0.5,
                                             context=True)
    assert calls == calls_c == ["tumour"] * 8
    assert all(s["tumour"] == 1.0 for s in shares + shares_c)
    assert ctx.shape[0] > 2 * alone.shape[0]           # the mirrored blocks, 3x the tiles
    assert (ctx == 2).sum() > 4 * (alone == 2).sum()   # their mirrored pink rims, all round


def _other_figures() -> dict:
    nan = float("nan")
    return {"ebhi_val": {"overall": 0.5, "dice": {"tumour": nan}, "epithelium_dice": 0.5},
            "ebhi_lesion_val": {"epithelium_dice": 0.5, "stroma_called_tumour": 0.1},
            "windows": {"window_um": 112, "flipped": 1, "windows": 2, "flip_share": 0.5,
                        "pixel_agreement": 0.9}}


def test_evaluate_ood_needs_the_data(tmp_path):
    model = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
    r = CliRunner().invoke(main, ["evaluate-ood", str(model), "--data", str(tmp_path)])
    assert r.exit_code == 2
    assert "--data" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["evaluate-ood", str(model), "--kather-mpp", "0"])
    assert r.exit_code == 2 and "--kather-mpp" in r.stderr
