"""Measurements and viewer outputs made by `wsiseg segment` and `wsiseg report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner
from onnx_models import colour_rule_model, contract
from synth import PINK_RGB, PURPLE_RGB, make_slide

from wsiseg.analysis import AnalysisOptions, outputs_beside
from wsiseg.cli import main
from wsiseg.contract import to_metadata
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.tsr import TSRConfig
from wsiseg.writer import read_level, write_pyramid


def run(*args) -> CliRunner.invoke:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model_8um(tmp_path_factory) -> Path:
    """Colour-rule model declared at 8 um/px, so a synthetic slide of a few mm stays small."""
    meta = to_metadata(contract(mpp=8.0, tile_px=64, border_px=8, size_multiple=8))
    return colour_rule_model(tmp_path_factory.mktemp("m") / "c8.onnx", meta=meta)


def test_known_tsr_through_segment_and_report(tmp_path, model_8um):
    """A 4 x 4 mm slide at 8 um/px: tumour (purple) frame and stroma (pink) inside, 30 % stroma
    within a 2.2 mm field centred on the slide; segment measures it, report re-measures it."""
    n = 500  # 4 mm at 8 um/px
    rgb = np.full((n, n, 3), 255, np.uint8)
    rr, cc = np.mgrid[:n, :n]
    r_um = np.hypot(rr + 0.5 - n / 2, cc + 0.5 - n / 2) * 8
    rgb[r_um < 1800] = PURPLE_RGB
    # stroma disc inside the field with area 30 % of the 2.2 mm field (radius = sqrt(0.3) * 1.1 mm)
    rgb[r_um < np.sqrt(0.3) * 1100] = PINK_RGB
    slide = tmp_path / "ring.tif"
    make_slide(slide, rgb, mpp=8.0, levels=2, tile_px=128)
    out = tmp_path / "ring-map.tif"
    cfg = TSRConfig(grid_um=8.0)
    report = segment_slide(slide, out, model=model_8um, options=SegmentOptions(tile_px=64),
                           analysis=AnalysisOptions(tsr_config=cfg))
    hot = report["tsr"]["hotspot"]
    assert hot is not None
    assert hot["tsr_pct"] == pytest.approx(30.0, abs=1.5)  # disc rasterised on an 8 um grid
    # Any field that holds the whole disc ties at 30 %: its centre is within 1100 - 602 um.
    assert np.hypot(hot["centre_row_um"] - 2000, hot["centre_col_um"] - 2000) <= 1100 - 602 + 16
    assert hot["score_pct"] == 30 or hot["score_pct"] == 40
    assert report["tsr"]["stroma_classes"] == ["stroma"]
    # Class areas from the report equal the map's pixel counts exactly.
    labels = read_level(out)
    areas = {c["name"]: c["area_mm2"] for c in report["class_stats"]["classes"]}
    assert areas["stroma"] == pytest.approx((labels == 2).sum() * 64e-6)
    assert areas["tumour"] == pytest.approx((labels == 1).sum() * 64e-6)
    # Every output is there; the TSR map opens in OpenSlide with its own mpp.
    outs = outputs_beside(out)
    assert all(p.is_file() for p in outs.values())
    with openslide.OpenSlide(str(outs["tsr"])) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(8.0)
    tsr_map = read_level(outs["tsr"])
    assert abs(int(tsr_map[250, 250]) - hot["tsr_pct"]) <= 1
    assert (tsr_map[:20, :20] == 255).all()  # corners: no eligible field
    # CSV: header + one row with the same hot-spot TSR.
    rows = list(csv.DictReader(outs["csv"].open()))
    assert len(rows) == 1
    assert float(rows[0]["tsr_hotspot_pct"]) == pytest.approx(hot["tsr_pct"], abs=0.05)
    # `wsiseg report` on the existing map gives the same numbers (no re-inference).
    r = run("report", out, "--overwrite", "--tsr-field-um", "2200")
    assert r.exit_code == 0, r.output
    # --tsr-field-um etc. use TSRConfig defaults otherwise (32 um grid): close, not identical
    again = json.loads(r.output)
    assert again["class_stats"] == report["class_stats"]
    assert again["tsr"]["hotspot"]["tsr_pct"] == pytest.approx(30.0, abs=2.5)


def test_report_refuses_existing_outputs_and_foreign_tiffs(tmp_path, model_8um):
    rgb = np.full((100, 100, 3), 255, np.uint8)
    rgb[20:80, 20:80] = PURPLE_RGB
    slide = tmp_path / "s.tif"
    make_slide(slide, rgb, mpp=8.0, levels=1)
    out = tmp_path / "m.tif"
    segment_slide(slide, out, model=model_8um, options=SegmentOptions(tile_px=64))
    r = run("report", out)
    assert r.exit_code == 1 and "--overwrite" in r.output
    # A TIFF that is not a wsiseg map (no description, no mpp) is a clear error.
    plain = tmp_path / "plain.tif"
    write_pyramid(plain, np.zeros((50, 50), np.uint8), mpp=1.0)
    r = run("report", plain)
    assert r.exit_code == 1 and "not a class map written by wsiseg" in r.output
    junk = tmp_path / "junk.tif"
    junk.write_text("not a tiff")
    r = run("report", junk)
    assert r.exit_code == 1 and "not a class map" in r.output and "Traceback" not in r.output
    r = run("report", tmp_path / "missing.tif")
    assert r.exit_code == 1 and "map not found" in r.output


def test_map_without_tumour_class_gives_null_tsr_with_reason(tmp_path):
    meta = to_metadata(contract(mpp=8.0, tile_px=64, border_px=8, size_multiple=8,
                                tumour_classes=()))
    model = colour_rule_model(tmp_path / "nt.onnx", meta=meta)
    rgb = np.full((120, 120, 3), 255, np.uint8)
    rgb[10:110, 10:110] = PINK_RGB
    slide = tmp_path / "s.tif"
    make_slide(slide, rgb, mpp=8.0, levels=1)
    report = segment_slide(slide, tmp_path / "m.tif", model=model,
                           options=SegmentOptions(tile_px=64))
    assert report["tsr"]["hotspot"] is None and report["tsr"]["whole"] is None
    assert "tumour" in report["tsr"]["hotspot_reason"]
    assert (tmp_path / "m.preview.png").is_file() and (tmp_path / "m.geojson").is_file()


def test_empty_map(tmp_path, model_8um):
    slide = tmp_path / "blank.tif"
    make_slide(slide, np.full((90, 90, 3), 255, np.uint8), mpp=8.0, levels=1)
    report = segment_slide(slide, tmp_path / "m.tif", model=model_8um,
                           options=SegmentOptions(tile_px=64))
    assert report["class_stats"]["tissue_mm2"] == 0
    assert report["tsr"]["hotspot"] is None and report["tsr"]["hotspot_reason"]
    gj = json.loads((tmp_path / "m.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"] == []


@pytest.mark.slow
def test_tcga_outputs_and_geojson_placement(slides_dir, tmp_path):
    """The real TCGA slide (no mpp: --mpp 0.5): every output is written, the TSR map opens in
    OpenSlide, and GeoJSON polygons land on the labelled pixels in slide level-0 coordinates."""
    meta = to_metadata(contract(mpp=2.0, tile_px=256, border_px=16, size_multiple=16))
    model = colour_rule_model(tmp_path / "c2.onnx", meta=meta)
    out = tmp_path / "tcga.tif"
    r = run("-q", "segment", slides_dir / "tcga-cr-7395-01a-01-ts1.svs", "--mpp", "0.5",
            "-o", out, "--model", model)
    assert r.exit_code == 0, r.output
    outs = outputs_beside(out)
    assert all(p.is_file() and p.stat().st_size > 0 for p in outs.values())
    with openslide.OpenSlide(str(outs["tsr"])) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(32.0, rel=0.01)
    report = json.loads(out.with_suffix(".json").read_text())
    labels = read_level(out)  # level 0 at 2 um/px = 4 slide level-0 px per map px
    scale = report["map"]["mpp"] / report["slide"]["mpp"]
    gj = json.loads(outs["geojson"].read_text())
    stroma = next(f for f in gj["features"]
                  if f["properties"]["classification"]["name"] == "stroma")
    xs = [p[0] for poly in stroma["geometry"]["coordinates"] for ring in poly for p in ring]
    ys = [p[1] for poly in stroma["geometry"]["coordinates"] for ring in poly for p in ring]
    rows, cols = np.nonzero(labels == 2)
    level_px = 8.0 / report["map"]["mpp"]  # GeoJSON traced at <= 8 um/px
    tol = (level_px + 1) * scale
    assert min(xs) == pytest.approx(cols.min() * scale, abs=tol)
    assert max(xs) == pytest.approx((cols.max() + 1) * scale, abs=tol)
    assert min(ys) == pytest.approx(rows.min() * scale, abs=tol)
    assert max(ys) == pytest.approx((rows.max() + 1) * scale, abs=tol)
    assert max(xs) <= 4443 + tol and max(ys) <= 3567 + tol
