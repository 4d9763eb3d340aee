"""Edge tiles fitted to the map: fewer pixels computed, the same map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_models import colour_rule_model
from synth import make_slide

from wsiseg import pipeline
from wsiseg.engine import load_model
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.slide import Slide
from wsiseg.tiling import choose_tile_px, computed_px, fitted_px, tile_grid
from wsiseg.writer import read_level

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "ebhi-val-mosaic.tif"
MODEL = ROOT / "models" / "wsiseg-ebhi-unet.onnx"


def test_fitted_px_rounds_the_short_core_up_and_never_exceeds_the_tile():
    assert fitted_px(100, tile_px=512, border_px=112, fit_multiple=16) == 336   # 324 -> 336
    assert fitted_px(288, tile_px=512, border_px=112, fit_multiple=16) == 512
    assert fitted_px(1, tile_px=512, border_px=112, fit_multiple=128) == 256    # 225 -> 256
    assert fitted_px(100, tile_px=512, border_px=112, fit_multiple=0) == 512    # not fitted


def test_fitted_grid_keeps_every_core_and_shrinks_only_edge_tiles():
    shape, t, b = (1483, 1110), 768, 112  # CMU-1-Small at 1 um/px
    square = tile_grid(shape, tile_px=t, border_px=b)
    fitted = tile_grid(shape, tile_px=t, border_px=b, fit_multiple=16)
    def cores(g):
        return [(x.out_row, x.out_col, x.core_row, x.core_col, x.core_h, x.core_w) for x in g]
    assert cores(fitted) == cores(square)
    core = t - 2 * b
    for x in fitted:
        assert x.in_h % 16 == 0 and x.in_w % 16 == 0
        # the input still holds the core and a full border on every side
        assert x.in_h >= x.core_h + 2 * b and x.in_w >= x.core_w + 2 * b
        assert (x.in_h == t) == (x.core_h == core) and (x.in_w == t) == (x.core_w == core)
    assert all(x.in_h == x.in_w == t for x in square)
    assert computed_px(fitted) < 0.8 * computed_px(square)
    # a tile that is not a multiple of the fit (1040 px with GPU's 128 px steps): fitted tiles
    # stay multiples of 128 or keep the full tile
    for x in tile_grid(shape, tile_px=1040, border_px=b, fit_multiple=128):
        assert x.in_h == 1040 or x.in_h % 128 == 0


def test_a_small_slide_runs_as_one_tile_of_its_own_shape():
    """CMU-1-Small (1483 x 1110 at 1 um/px) with the 112 px border: one square 1792 px tile
    computes 1.95 x the map's pixels; one fitted 1712 x 1344 tile 1.40 x."""
    shape = (1483, 1110)
    t = choose_tile_px(shape, None, border_px=112, multiple=16, smallest_px=384, fit_multiple=16)
    tiles = tile_grid(shape, tile_px=t, border_px=112, fit_multiple=16)
    assert len(tiles) == 1 and (tiles[0].in_h, tiles[0].in_w) == (1712, 1344)
    assert computed_px(tiles) / (shape[0] * shape[1]) == pytest.approx(1.40, abs=0.01)


def test_fit_on_the_cpu_is_the_models_size_multiple(tmp_path):
    model = load_model(colour_rule_model(tmp_path / "colour.onnx"), device="cpu")
    assert pipeline.fit_multiple(model) == model.contract.size_multiple


def _segment(slide: Path, out: Path) -> tuple[np.ndarray, dict]:
    report = segment_slide(slide, out, model=MODEL, analysis=None,
                           options=SegmentOptions(tile_px=512, tissue=None))
    return read_level(out), report


@pytest.mark.skipif(not MODEL.exists() or not DEMO.exists(), reason="needs the shipped model")
def test_fitted_edge_tiles_give_the_same_map_as_square_tiles(tmp_path, monkeypatch):
    """The default model (its border = its measured context) on real tissue: 400 x 350 px of
    the demo, 512 px tiles (cores of 512 - 2 * border px, under 350), so three of four tiles are
    edge tiles."""
    with Slide(DEMO) as s:
        rgb, _ = s.read(s.plan(1.0), 300, 200, 400, 350)
    make_slide(tmp_path / "crop.tif", rgb, mpp=1.0, levels=1, tile_px=128)
    fitted, rep_fitted = _segment(tmp_path / "crop.tif", tmp_path / "fitted.tif")
    monkeypatch.setattr(pipeline, "fit_multiple", lambda model: 0)
    square, rep_square = _segment(tmp_path / "crop.tif", tmp_path / "square.tif")
    assert rep_fitted["tiles"]["fitted_edges"] and not rep_square["tiles"]["fitted_edges"]
    assert rep_fitted["tiles"]["run"] == rep_square["tiles"]["run"] == 4
    # each edge tile: the rest of the side beyond the first core, plus both borders, rounded
    # up to the size multiple (112 px border: 336 x 288; 96 px: 272 x 224)
    c = load_model(MODEL, device="cpu").contract
    b, m = c.border_px, c.size_multiple
    assert 512 - 2 * b < 350
    rows, cols = (-(-(side - (512 - 2 * b) + 2 * b) // m) * m for side in (400, 350))
    assert sorted(rep_fitted["tiles"]["shapes"]) == sorted(
        [[rows, cols, 1], [rows, 512, 1], [512, cols, 1], [512, 512, 1]])
    assert rep_square["tiles"]["shapes"] == [[512, 512, 4]]
    assert rep_fitted["tiles"]["computed_px_per_output_px"] == pytest.approx(
        (512 * 512 + 512 * cols + rows * 512 + rows * cols) / (400 * 350))
    assert rep_square["tiles"]["computed_px_per_output_px"] == pytest.approx(
        4 * 512 * 512 / (400 * 350))
    assert len(np.unique(square)) >= 2
    np.testing.assert_array_equal(fitted, square)
