"""Engine tests with exact answers: synthetic slides + hand-built ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from onnx_models import box_filter_model, colour_rule_labels, colour_rule_model, contract
from synth import make_slide, make_tissue_rgb

from wsiseg.contract import to_metadata
from wsiseg.engine import load_model
from wsiseg.pipeline import OutputError, SegmentOptions, segment_slide
from wsiseg.slide import Slide
from wsiseg.writer import read_level


@pytest.fixture(scope="module")
def tissue(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 3-level synthetic slide at 2 um/px (the colour model's mpp) with known colours."""
    rgb, _ = make_tissue_rgb(300, 420, np.random.default_rng(1), n_blobs=4)
    path = tmp_path_factory.mktemp("slide") / "tissue.tif"
    make_slide(path, rgb, mpp=2.0, levels=3, tile_px=128)
    return path, rgb, colour_rule_labels(rgb)


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    return colour_rule_model(tmp_path_factory.mktemp("m") / "colour.onnx")


@pytest.mark.parametrize("mask", [True, False], ids=["tissue-mask", "no-tissue-mask"])
def test_exact_map_and_round_trip_through_openslide(tissue, colour_model, tmp_path, mask):
    slide_path, rgb, expected = tissue
    out = tmp_path / "map.tif"
    opts = SegmentOptions(tile_px=64, tissue=SegmentOptions().tissue if mask else None,
                          thumbnail_mpp=4.0)
    report = segment_slide(slide_path, out, model=colour_model, options=opts)
    got = read_level(out, level=0)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    # OpenSlide sees a pyramid with the right size and mpp, coloured by the model's palette.
    with openslide.OpenSlide(str(out)) as osr:
        assert osr.dimensions == (420, 300)
        levels = [tuple(lv) for lv in report["map"]["levels"]]
        assert [d[::-1] for d in osr.level_dimensions] == levels
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(2.0)
        region = np.asarray(osr.read_region((0, 0), 0, (420, 300)))[..., :3]
    colours = np.array([(0, 0, 0)] + [k.color for k in contract().classes], np.uint8)
    np.testing.assert_array_equal(region, colours[expected])
    # The report agrees with the map.
    r = json.loads(out.with_suffix(".json").read_text())
    assert r == json.loads(json.dumps(report))
    px_mm2 = 2.0 * 2.0 / 1e6
    for i, name in enumerate(contract().class_names):
        assert r["class_area_mm2"][name] == pytest.approx((expected == i + 1).sum() * px_mm2)
    if mask:
        assert 0 < r["tiles"]["run"] < r["tiles"]["total"]
    else:
        assert r["tiles"]["run"] == r["tiles"]["total"]


def test_tiled_equals_whole_region_with_resampling(tmp_path):
    """Seam-freedom: a model whose receptive field fits the border gives, tile by tile, the
    same labels as one pass over the whole region; here also through the resampling path
    (slide at 0.8 um/px, single level, model at 2 um/px)."""
    rng = np.random.default_rng(7)
    rgb, _ = make_tissue_rgb(500, 380, rng, n_blobs=6, noise=25.0)
    slide_path = tmp_path / "s.tif"
    make_slide(slide_path, rgb, mpp=0.8, levels=1, tile_px=128)
    model_path = box_filter_model(tmp_path / "box.onnx", depth=8)  # border_px = 8
    out = tmp_path / "map.tif"
    segment_slide(slide_path, out, model=model_path,
                  options=SegmentOptions(tile_px=48, tissue=None, batch_size=3))
    tiled = read_level(out, level=0)

    model = load_model(model_path, device="cpu")
    b = model.contract.border_px
    with Slide(slide_path) as s:
        plan = s.plan(model.contract.mpp)
        assert plan.resampled
        h, w = plan.out_shape
        whole, _ = s.read(plan, -b, -b, h + 2 * b, w + 2 * b)
    scores = model.run(whole[None])[0]
    reference = (scores.argmax(axis=0) + 1).astype(np.uint8)[b:b + h, b:b + w]
    assert tiled.shape == reference.shape == (round(500 * 0.4), round(380 * 0.4))
    assert len(np.unique(reference)) == 3  # the test means something only with all classes
    np.testing.assert_array_equal(tiled, reference)


def test_integer_factor_reads_are_block_means_and_tiles_match_the_whole(tmp_path):
    """A slide at 0.99 um/px read for a 2 um/px model: within 3 % of factor 2, so each output
    pixel is the rounded mean of a 2 x 2 block, the map's mpp is 1.98, and tiles through the
    pipeline equal one pass over the whole region."""
    rng = np.random.default_rng(3)
    rgb, _ = make_tissue_rgb(300, 250, rng, n_blobs=5, noise=25.0)
    slide_path = tmp_path / "s.tif"
    make_slide(slide_path, rgb, mpp=0.99, levels=1, tile_px=64)
    with Slide(slide_path) as s:
        plan = s.plan(2.0)
        assert (plan.box, plan.mpp, plan.out_shape) == (2, pytest.approx(1.98), (150, 125))
        assert not plan.resampled and plan.method == "2x2 mean"
        got, scanned = s.read(plan, 10, 20, 40, 30)
    block = rgb[20:100, 40:100].reshape(40, 2, 30, 2, 3).astype(np.uint32).sum(axis=(1, 3))
    np.testing.assert_array_equal(got, (block + 2) // 4)
    assert scanned.all()

    model_path = box_filter_model(tmp_path / "box.onnx", depth=8)
    out = tmp_path / "map.tif"
    report = segment_slide(slide_path, out, model=model_path,
                           options=SegmentOptions(tile_px=48, tissue=None, batch_size=3))
    assert report["map"]["mpp"] == pytest.approx(1.98)
    model = load_model(model_path, device="cpu")
    b = model.contract.border_px
    with Slide(slide_path) as s:
        whole, _ = s.read(plan, -b, -b, 150 + 2 * b, 125 + 2 * b)
    reference = (model.run(whole[None])[0].argmax(axis=0) + 1).astype(np.uint8)[b:-b, b:-b]
    assert len(np.unique(reference)) == 3
    np.testing.assert_array_equal(read_level(out, level=0), reference)


def test_blank_slide_gives_all_background(tmp_path, colour_model):
    slide_path = tmp_path / "blank.tif"
    make_slide(slide_path, np.full((200, 260, 3), 250, np.uint8), mpp=2.0, levels=2)
    out = tmp_path / "map.tif"
    report = segment_slide(slide_path, out, model=colour_model,
                           options=SegmentOptions(tile_px=64, thumbnail_mpp=4.0))
    assert report["tiles"]["run"] == 0
    assert report["tissue_mm2"] == 0
    background = contract().background_value
    assert (read_level(out, level=0) == background).all()


def test_probabilities_output(tissue, colour_model, tmp_path):
    from wsiseg.writer import read_stack
    slide_path, _, expected = tissue
    out = tmp_path / "map.tif"
    segment_slide(slide_path, out, model=colour_model,
                  options=SegmentOptions(tile_px=64, tissue=None, probabilities=True))
    probs = read_stack(out.with_suffix(".prob.tif"))
    assert probs.shape == (3, *expected.shape)
    np.testing.assert_array_equal(probs.argmax(axis=0) + 1 == expected,
                                  np.ones_like(expected, bool) | (probs.max(axis=0) < 128))
    assert (np.abs(probs.astype(int).sum(axis=0) - 255) <= 2).all()


# -- bad input ----------------------------------------------------------------------------------

def test_existing_output_needs_overwrite(tissue, colour_model, tmp_path):
    out = tmp_path / "map.tif"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        segment_slide(tissue[0], out, model=colour_model)
    assert out.read_bytes() == b"keep me"
    segment_slide(tissue[0], out, model=colour_model, overwrite=True,
                  options=SegmentOptions(tile_px=64))
    assert out.read_bytes()[:2] in (b"II", b"MM")


@pytest.mark.parametrize("out", [Path("/proc/map.tif"), Path("/proc/new/map.tif")],
                         ids=["read-only", "cannot-create"])
def test_unwritable_output_folder(tissue, colour_model, out):
    with pytest.raises(OutputError, match="folder"):
        segment_slide(tissue[0], out, model=colour_model)


def test_missing_output_folder_is_created(tissue, colour_model, tmp_path):
    out = tmp_path / "a" / "b" / "map.tif"
    segment_slide(tissue[0], out, model=colour_model, options=SegmentOptions(tile_px=64))
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_interrupt_leaves_nothing(tissue, colour_model, tmp_path):
    out = tmp_path / "map.tif"
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_slide(tissue[0], out, model=colour_model, progress=progress,
                      options=SegmentOptions(tile_px=64, tissue=None))
    assert list(tmp_path.iterdir()) == []  # no map, no report, no temporary canvas


def test_model_without_contract(tmp_path):
    from wsiseg.engine import ModelError
    with pytest.raises(ModelError, match="no wsiseg contract"):
        load_model(colour_rule_model(tmp_path / "bare.onnx", meta={}))


def test_model_that_breaks_its_contract(tmp_path):
    from onnx import TensorProto

    from wsiseg.engine import ModelError
    with pytest.raises(ModelError, match=r"contract needs \[1, 3,"):
        load_model(colour_rule_model(tmp_path / "four.onnx", n_out=4))
    with pytest.raises(ModelError, match="input uint8 but the graph takes tensor.float"):
        load_model(colour_rule_model(tmp_path / "f.onnx", input_type=TensorProto.FLOAT))
    bad = dict(to_metadata(contract()))
    bad["wsiseg.tumour_classes"] = '["carcinoma"]'
    with pytest.raises(ModelError, match="tumour class 'carcinoma' is not one of"):
        load_model(colour_rule_model(tmp_path / "c.onnx", meta=bad))


def test_not_a_model(tmp_path):
    from wsiseg.engine import ModelError
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not a model ONNX Runtime can load"):
        load_model(p)


def test_gpu_request_falls_back_to_cpu(colour_model, caplog):
    from wsiseg.engine import providers_for
    assert providers_for("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert providers_for("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                      "CPUExecutionProvider"])[0] == "TensorrtExecutionProvider"
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        m = load_model(colour_model, device="cuda")
        assert m.providers == ["CPUExecutionProvider"]
        assert "running on the CPU" in caplog.text


def test_default_tile_size_computes_fewest_pixels():
    from wsiseg.tiling import choose_tile_px, tile_grid
    # A 1108 x 1481 map (CMU-1 at 1 um/px): 1024 tiles would need 2 x 2 = 4 Mpx of input.
    t = choose_tile_px((1481, 1108), None, border_px=32, multiple=16)
    cost = len(tile_grid((1481, 1108), tile_px=t, border_px=32)) * t * t
    assert t % 16 == 0 and cost < 4 * 1024 * 1024
    for other in range(384, 1025, 128):
        assert cost <= len(tile_grid((1481, 1108), tile_px=other, border_px=32)) * other ** 2
    # A large map keeps the largest tile; a tissue mask changes the choice.
    assert choose_tile_px((20000, 20000), None, border_px=32, multiple=16) == 1024
    mask = np.zeros((100, 100), bool)
    mask[10, 10] = True  # one speck of tissue: the smallest tile is cheapest
    assert choose_tile_px((20000, 20000), mask, border_px=32, multiple=16) == 384


def test_wide_borders_get_larger_default_tiles():
    """The largest default tile grows with the border (about 16 x), so that on a large slide
    the border costs at most about 30 %, up to 2048 px."""
    from wsiseg.tiling import choose_tile_px, largest_tile_px, tile_grid
    assert largest_tile_px(32, multiple=16) == 1024
    assert largest_tile_px(112, multiple=16) == 1920
    assert largest_tile_px(300, multiple=16) == 2048
    t = choose_tile_px((20000, 20000), None, border_px=112, multiple=16, smallest_px=240)
    n = len(tile_grid((20000, 20000), tile_px=t, border_px=112))
    assert t > 1024 and n * t * t / 20000 ** 2 < 1.35  # 1.28 plus the grid remainder


@pytest.mark.parametrize("k", [2, 3, 4])
def test_block_mean_and_majority_match_a_plain_reshape(k):
    from wsiseg.slide import _block_majority, block_mean
    rng = np.random.default_rng(k)
    rgb = rng.integers(0, 256, (6 * k, 5 * k, 3), dtype=np.uint8)
    ref = rgb.reshape(6, k, 5, k, 3).astype(np.float64).mean(axis=(1, 3))
    got = block_mean(rgb, k)
    assert got.dtype == np.uint8 and np.abs(got - ref).max() <= 0.5 + 1e-9
    mask = rng.random((6 * k, 5 * k)) < 0.5
    want = mask.reshape(6, k, 5, k).sum(axis=(1, 3)) * 2 > k * k
    np.testing.assert_array_equal(_block_majority(mask, k), want)
    assert _block_majority(np.ones((2 * k, 2 * k), bool), k).all()
