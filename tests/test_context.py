"""Effective context (wsiseg.context), the border set from it (training/border.py) and the
tile-size agreement of maps (wsiseg.seams)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_models import box_filter_model, colour_rule_model

from wsiseg.context import ContextError, ContextParams, effective_context, measure_context
from wsiseg.contract import from_metadata
from wsiseg.engine import load_model
from wsiseg.seams import compare_maps, core_edge_mask, tile_agreement
from wsiseg.tiling import largest_tile_px

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
SMALL = ContextParams(window_px=32, max_px=32, samples=4)


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_context_of_a_box_filter_is_its_receptive_field(tmp_path):
    """12 stacked 3x3 filters: the output depends on input up to 12 px away, measured on the
    demo mosaic in steps of 8 px (the model's size_multiple)."""
    model = load_model(box_filter_model(tmp_path / "box.onnx", depth=12), device="cpu")
    r = measure_context(model, params=SMALL)
    curve = {row["distance_px"]: row for row in r["curve"]}
    assert sorted(curve) == [8, 16, 24]  # the reference has 32
    assert curve[8]["cut_prob"] > 0 and curve[8]["swap_prob"] > 0
    for d in (16, 24):
        assert curve[d]["cut_flips"] == curve[d]["swap_flips"] == 0
        assert curve[d]["cut_prob"] < 1e-6 and curve[d]["swap_prob"] < 1e-6
    assert r["context_px"] == 16 and r["tissue"] == "ebhi-val-mosaic.tif"


def test_effective_context_needs_every_larger_distance_to_pass():
    p = ContextParams(flip_tol=0.001, prob_tol=0.05)
    ok = {"cut_flips": 0.0, "swap_flips": 0.0, "cut_prob": 0.01, "swap_prob": 0.0}
    bad = {**ok, "swap_flips": 0.01}
    curve = [{"distance_px": 16, **ok}, {"distance_px": 32, **bad}, {"distance_px": 48, **ok},
             {"distance_px": 64, **ok}]
    assert effective_context(curve, p) == 48
    assert effective_context(curve[:2], p) is None


def test_context_params_are_checked(tmp_path):
    model = load_model(box_filter_model(tmp_path / "box.onnx", depth=2), device="cpu")
    with pytest.raises(ContextError, match="multiples of 8"):
        measure_context(model, params=ContextParams(max_px=20))
    with pytest.raises(ContextError, match="samples at least 2"):
        measure_context(model, params=ContextParams(samples=1))
    with pytest.raises(ContextError, match="smaller than"):
        measure_context(model, params=ContextParams(max_px=512))


def test_set_border_rewrites_only_the_contract(tmp_path):
    from wsiseg_train.border import set_border

    src = colour_rule_model(tmp_path / "m.onnx")  # tile 64, border 8, size_multiple 8
    before = _meta(src)
    graph = onnx.load(str(src)).graph.SerializeToString()
    new = set_border(src, 40, record={"context_px": 40}, out=tmp_path / "copy.onnx")
    assert _meta(src) == before  # the source is untouched when out is given
    meta = _meta(tmp_path / "copy.onnx")
    c = from_metadata(meta)
    assert (c.border_px, c.tile_px) == (40, 88) == (new["border_px"], new["tile_px"])
    assert c.training["context"] == {"context_px": 40}
    assert {k: v for k, v in meta.items() if k not in ("wsiseg.border_px", "wsiseg.tile_px",
                                                       "wsiseg.training")} == \
        {k: v for k, v in before.items() if k not in ("wsiseg.border_px", "wsiseg.tile_px",
                                                      "wsiseg.training")}
    assert onnx.load(str(tmp_path / "copy.onnx")).graph.SerializeToString() == graph
    set_border(src, 16)  # in place
    assert from_metadata(_meta(src)).border_px == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "m.onnx"]


def test_context_command_applies_the_border(tmp_path):
    from wsiseg_train.cli import main

    path = box_filter_model(tmp_path / "box.onnx", depth=12)
    r = CliRunner().invoke(main, ["context", str(path), "--max-px", "32", "--samples", "4",
                                  "--apply"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["context_px"] == out["border_px"] == 16
    c = from_metadata(_meta(path))
    assert c.border_px == 16 and c.training["context"]["context_px"] == 16
    assert [row["distance_px"] for row in c.training["context"]["curve"]] == [8, 16, 24]


def test_context_command_fails_when_the_context_is_wider_than_measured(tmp_path):
    from wsiseg_train.cli import main

    path = box_filter_model(tmp_path / "box.onnx", depth=20)
    before = _meta(path)
    r = CliRunner().invoke(main, ["context", str(path), "--max-px", "16", "--samples", "2",
                                  "--apply"])
    assert r.exit_code == 1
    assert "larger --max-px" in r.stderr and "Traceback" not in r.output
    assert _meta(path) == before


def test_seam_statistics_find_disagreement_on_core_edges():
    shape, b = (300, 260), 16
    near = core_edge_mask(shape, tile_px=96, border_px=b, edge_px=2)
    assert near[62:66].all() and not near[70:120, 70:120].any()  # cores of 64 px meet at 64
    a = np.ones(shape, np.uint8)
    seamed = a.copy()
    seamed[near] = 2  # disagree exactly on the edges
    s = compare_maps(a, seamed, tile_sizes=(96, 1024), border_px=b, edge_px=2)
    assert s["elsewhere"] == 0 and s["near_edges"] == 1 and s["seam_factor"] == float("inf")
    noisy = a.copy()
    noisy[np.random.default_rng(0).random(shape) < 0.01] = 2  # no seams: the same everywhere
    s = compare_maps(a, noisy, tile_sizes=(96, 1024), border_px=b, edge_px=2)
    assert 0.98 < s["agreement"] < 0.995 and 0.5 < s["seam_factor"] < 1.5


@pytest.mark.slow
@pytest.mark.parametrize("slide", ["CMU-1-Small-Region.svs", "ebhi-val-mosaic.tif"])
def test_shipped_model_maps_agree_across_tile_sizes(slide):
    """The shipped model's border is its measured context, so a small tile (384 px; the smallest
    the engine would choose, 256 px, keeps a 32 px core and takes minutes here) and the largest
    default tile give the same map up to 0.2 % of pixels, with no more disagreement near
    tile-core edges than elsewhere (factor <= 1.5)."""
    c = load_model(SHIPPED, device="cpu").contract
    assert c.border_px >= c.training["context"]["context_px"]
    largest = largest_tile_px(c.border_px, multiple=c.size_multiple)
    r = tile_agreement(ROOT / "examples" / slide, SHIPPED, tile_sizes=(384, largest))
    assert r["agreement"] >= 0.998
    assert r["near_edges"] <= 1.5 * r["elsewhere"] or r["near_edges"] == 0
    assert r["slide_margin"] <= 0.002
