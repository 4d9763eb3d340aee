import json

import numpy as np
import pytest

from wsiseg.geojson import (
    class_features,
    feature_collection,
    hotspot_feature,
    mask_polygons,
    write_geojson,
)
from wsiseg.tsr import Hotspot

NAMES = ["tumour", "stroma", "background"]
COLORS = [(230, 25, 75), (245, 130, 48), (255, 255, 255)]


def signed_area(ring):
    x, y = np.asarray(ring, float).T
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def check_ring(ring):
    assert len(ring) >= 4 and ring[0] == ring[-1]
    assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in ring)


def check_structure(collection):
    assert collection["type"] == "FeatureCollection"
    for f in collection["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert isinstance(props["classification"]["name"], str)
        assert len(props["classification"]["color"]) == 3
        geom = f["geometry"]
        polygons = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        for poly in polygons:
            for i, ring in enumerate(poly):
                check_ring(ring)
                assert (signed_area(ring) > 0) == (i == 0)  # exterior +, holes -


def test_polygon_bounds_match_the_labelled_region_in_slide_pixels():
    labels = np.zeros((50, 80), np.uint8)
    labels[10:20, 30:45] = 1
    labels[30:40, 5:12] = 2
    labels[32:35, 7] = 0  # notch, not a hole
    scale, offset = 4.0, (100.0, 200.0)
    feats = class_features(labels, class_names=NAMES, colors=COLORS, mpp=8.0, scale=scale,
                           offset_xy=offset, min_area_um2=0)
    check_structure(feature_collection(feats))
    by_name = {f["properties"]["classification"]["name"]: f for f in feats}
    assert set(by_name) == {"tumour", "stroma"}
    assert by_name["tumour"]["properties"]["classification"]["color"] == [230, 25, 75]
    (poly,) = by_name["tumour"]["geometry"]["coordinates"]
    x, y = np.asarray(poly[0]).T
    # map rows 10..19, cols 30..44 -> level-0 x 100 + [30, 45] * 4, y 200 + [10, 20] * 4
    expected = (220.0, 240.0, 280.0, 280.0)
    assert np.allclose((x.min(), y.min(), x.max(), y.max()), expected, atol=scale)
    # simplification moves edges by at most the tolerance (half a map pixel)
    assert abs(signed_area(poly[0]) - 10 * 15 * scale ** 2) <= 0.5 * 50 * scale ** 2


def test_a_hole_becomes_an_interior_ring_and_an_island_its_own_polygon():
    labels = np.full((40, 40), 2, np.uint8)
    labels[5:35, 5:35] = 1
    labels[12:28, 12:28] = 2         # hole in the tumour
    labels[18:22, 18:22] = 1         # tumour island inside the hole
    (tumour,) = class_features(labels, class_names=NAMES, colors=COLORS, mpp=1.0,
                               skip_values=[2], min_area_um2=0)
    check_structure(feature_collection([tumour]))
    polys = sorted(tumour["geometry"]["coordinates"], key=len, reverse=True)
    assert len(polys) == 2 and len(polys[0]) == 2 and len(polys[1]) == 1
    hx, hy = np.asarray(polys[0][1]).T
    assert np.allclose((hx.min(), hy.min(), hx.max(), hy.max()), (12, 12, 28, 28), atol=1.0)
    ix, iy = np.asarray(polys[1][0]).T
    assert np.allclose((ix.min(), iy.min(), ix.max(), iy.max()), (18, 18, 22, 22), atol=1.0)


def test_diagonal_neighbours_are_one_component_with_one_exterior():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    mask[4:7, 4:7] = True
    polys = mask_polygons(mask, mpp=1.0)
    assert len(polys) == 1 and len(polys[0]) == 1
    check_ring(polys[0][0])


def test_small_regions_and_holes_are_dropped_below_min_area():
    labels = np.zeros((30, 30), np.uint8)
    labels[2:4, 2:4] = 1           # 4 px = 400 um2 at 10 um/px
    labels[10:25, 10:25] = 1       # 225 px, with a 4-px hole
    labels[16:18, 16:18] = 0
    keep_all = class_features(labels, class_names=NAMES, colors=COLORS, mpp=10.0,
                              min_area_um2=0)
    assert len(keep_all[0]["geometry"]["coordinates"]) == 2
    assert sum(len(p) for p in keep_all[0]["geometry"]["coordinates"]) == 3  # with the hole
    big_only = class_features(labels, class_names=NAMES, colors=COLORS, mpp=10.0,
                              min_area_um2=1000)
    (poly,) = big_only[0]["geometry"]["coordinates"]
    assert len(poly) == 1  # hole filled too
    assert class_features(labels, class_names=NAMES, colors=COLORS, mpp=10.0,
                          min_area_um2=1e6) == []


def test_simplification_reduces_vertices_of_a_disk_but_keeps_its_size():
    rr, cc = np.mgrid[:200, :200]
    mask = (rr - 100) ** 2 + (cc - 100) ** 2 <= 80 ** 2
    fine = mask_polygons(mask, mpp=1.0, tolerance_um=0)[0][0]
    coarse = mask_polygons(mask, mpp=1.0, tolerance_um=2.0)[0][0]
    assert len(coarse) < len(fine) / 3
    assert abs(signed_area(fine) - mask.sum()) / mask.sum() < 0.001
    assert abs(signed_area(coarse) - mask.sum()) / mask.sum() < 0.02  # chords cut 2 um inside


def test_hotspot_circle():
    hot = Hotspot(tumour_mm2=1.0, stroma_mm2=2.0, tsr_pct=66.7, score_pct=70,
                  category="stroma-high", diameter_um=2200.0, centre_row_um=5000.0,
                  centre_col_um=3000.0, centre_row_px=5000.0, centre_col_px=3000.0)
    f = hotspot_feature(hot, slide_mpp=0.5, offset_xy=(10.0, 20.0))
    check_structure(feature_collection([f]))
    ring = np.asarray(f["geometry"]["coordinates"][0])
    assert len(ring) == 73
    centre = np.array([10 + 6000, 20 + 10000])
    assert np.allclose(np.hypot(*(ring - centre).T), 2200, atol=0.01)
    assert np.allclose(ring[:-1].mean(axis=0), centre, atol=0.01)
    assert f["properties"]["classification"]["name"] == "TSR hot spot"
    assert "67%" in f["properties"]["name"] and "stroma-high" in f["properties"]["name"]


def test_write_geojson_is_valid_json_and_leaves_no_temporary(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 1
    feats = class_features(labels, class_names=NAMES, colors=COLORS, mpp=1.0, min_area_um2=0)
    path = tmp_path / "slide.geojson"
    write_geojson(path, feats)
    data = json.loads(path.read_text())
    check_structure(data)
    assert [p.name for p in tmp_path.iterdir()] == ["slide.geojson"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="colours"):
        class_features(np.zeros((3, 3), np.uint8), class_names=NAMES, colors=COLORS[:2], mpp=1.0)
    with pytest.raises(ValueError, match="mpp"):
        mask_polygons(np.zeros((3, 3), bool), mpp=0)


def test_simplify_ring_keeps_corners_and_drops_points_within_tolerance():
    from wsiseg.geojson import simplify_ring
    side = np.arange(0, 10, 0.5)
    square = np.vstack([np.c_[side * 0, side], np.c_[side, side * 0 + 10],
                        np.c_[side * 0 + 10, 10 - side], np.c_[10 - side, side * 0], [[0, 0]]])
    out = simplify_ring(square, 0.1)
    assert out.tolist() == [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]
    zigzag = np.c_[np.arange(21.0), np.tile([0.0, 0.3], 11)[:21]]
    assert len(simplify_ring(zigzag, 0.5)) == 2
    assert len(simplify_ring(zigzag, 0.1)) == 21
