"""Training reads slides through the engine's reader: the same pixels as inference."""

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave
from synth import make_slide
from wsiseg_train.data import GRID_TOLERANCE, load_slide_item, read_region
from wsiseg_train.sampling import extract

from wsiseg.slide import Slide

DEMO_SLIDE = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"


def _annotations(path):
    """One tumour square over the middle of the demo region (level-0 pixels)."""
    ring = [[200, 400], [1200, 400], [1200, 1400], [200, 1400], [200, 400]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"classification": {"name": "tumour"}}}]}))
    return path


@pytest.fixture
def item_at(tmp_path):
    items = []

    def load(model_mpp):
        item = load_slide_item({"slide": str(DEMO_SLIDE),
                                "annotations": str(_annotations(tmp_path / "a.geojson"))},
                               model_mpp=model_mpp, annotation="sparse",
                               class_map={"tumour": 1})
        items.append(item)
        return item

    yield load
    for item in items:
        item.slide.close()


@pytest.mark.parametrize("corner", [(528, 468), (-20, 1090), (1470, -5)])
def test_training_patch_is_the_engines_read(item_at, corner):
    """0.499 um/px read at 1 um/px: resampled by the engine onto the model's grid."""
    item = item_at(1.0)
    with Slide(DEMO_SLIDE) as engine:
        plan = engine.plan(1.0, tolerance=GRID_TOLERANCE)
        assert item.plan == plan and plan.resampled and plan.mpp == 1.0
        assert item.labels.shape == plan.out_shape
        row, col = corner
        want = engine.read(plan, row, col, 64, 64)[0]
    got = read_region(item, row, col, 64)
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
    np.testing.assert_array_equal(got, want)
    img, _ = extract(item, row + 32, col + 32, 64)  # the sampler's patch centred there
    np.testing.assert_array_equal(img, want)


def test_training_patch_is_the_inference_read_on_a_block_grid(item_at):
    """0.499 um/px read at 0.998 um/px: inference's own plan (2 x 2 block means) is the grid,
    and a training patch is byte for byte what a segmentation tile there reads."""
    item = item_at(0.998)
    with Slide(DEMO_SLIDE) as engine:
        inference = engine.plan(0.998)
        assert inference.box == 2 and item.plan == inference
        assert item.labels.shape == inference.out_shape
        want = engine.read(inference, 600, 400, 96, 96)[0]
    np.testing.assert_array_equal(read_region(item, 600, 400, 96), want)
    assert want.std() > 5  # tissue, not glass


def test_slide_mpp_comes_from_the_engine_or_the_config(tmp_path):
    rgb = np.full((64, 96, 3), 200, np.uint8)
    make_slide(tmp_path / "no-mpp.tif", rgb, mpp=None, levels=1, tile_px=32)
    labels = np.zeros((32, 48), np.uint8)
    labels[8:24, 8:40] = 1
    imsave(tmp_path / "labels.png", labels, check_contrast=False)
    item = {"slide": str(tmp_path / "no-mpp.tif"), "labels": str(tmp_path / "labels.png"),
            "labels_mpp": 2.0}
    with pytest.raises(ValueError, match="no-mpp.tif does not record its pixel size; give "
                                         "slide_mpp") as e:
        load_slide_item(item, model_mpp=1.0, annotation="dense")
    assert "\n" not in str(e.value)
    got = load_slide_item({**item, "slide_mpp": 0.5}, model_mpp=1.0, annotation="dense")
    try:
        assert got.plan.box == 2 and got.labels.shape == (32, 48)
        assert (got.labels == 1).sum() == 16 * 32
        np.testing.assert_array_equal(read_region(got, 0, 0, 8), 200)
    finally:
        got.slide.close()
