"""QuPath GeoJSON and ASAP XML polygons rasterised at the model mpp; slide-backed items."""

import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
from skimage.io import imsave
from skimage.transform import resize
from train_helpers import SHARED_DATA
from wsiseg_train.annotations import AnnotationError, rasterize, read_annotations
from wsiseg_train.data import load_slide_item, read_region
from wsiseg_train.sampling import extract

SQUARE = [[10, 10], [90, 10], [90, 90], [10, 90], [10, 10]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}
        for name, rings in features]}))
    return path


def _asap(path, annotations):
    body = "".join(
        f'<Annotation Name="a{i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
        "<Coordinates>" + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>'
                                   for k, (x, y) in enumerate(pts[:-1])) +
        "</Coordinates></Annotation>" for i, (group, pts) in enumerate(annotations))
    path.write_text(f"<ASAP_Annotations><Annotations>{body}</Annotations>"
                    "<AnnotationGroups/></ASAP_Annotations>")
    return path


def _expected_square_with_hole(scale):
    rr, cc = np.mgrid[0:50, 0:50] / scale
    inside = (rr >= 10) & (rr <= 90) & (cc >= 10) & (cc <= 90)
    hole = (rr > 40) & (rr < 60) & (cc > 40) & (cc < 60)
    return inside & ~hole


def test_geojson_polygon_with_hole(tmp_path):
    path = _geojson(tmp_path / "a.geojson", [("Tumor", [SQUARE, HOLE]),
                                             ("Stroma", [[[0, 0], [8, 0], [8, 8], [0, 0]]])])
    polys = read_annotations(path)
    labels = rasterize(polys, {"tumor": 1, "stroma": 2}, (100, 100), 0.5)
    assert labels.shape == (50, 50)
    tumour = labels == 1
    assert tumour[10, 10] and tumour[30, 8] and not tumour[25, 25]   # hole centre unannotated
    assert labels[25, 25] == 0 and labels[48, 48] == 0
    # area at 2 um/px: (80/2)^2 - (20/2)^2 pixels, within a pixel's rim
    assert abs(tumour.sum() - (40 * 40 - 10 * 10)) < 4 * 40
    assert (labels == 2).sum() > 0


def test_asap_exclusion_group_makes_a_hole_and_nested_wins(tmp_path):
    path = _asap(tmp_path / "a.xml", [("tumor", SQUARE), ("exclude", HOLE),
                                      ("lymphocytes", [[20, 20], [30, 20], [30, 30], [20, 20]])])
    labels = rasterize(read_annotations(path), {"tumor": 1, "lymphocytes": 3, "exclude": None},
                       (100, 100), 1.0)
    assert labels[50, 50] == 0 and labels[15, 80] == 1 and labels[22, 27] == 3
    assert labels[5, 5] == 0


def test_unknown_class_and_outside_slide_are_clear_errors(tmp_path):
    path = _geojson(tmp_path / "a.geojson", [("Mystery", [SQUARE])])
    with pytest.raises(AnnotationError, match="'Mystery' is not in the class map.*class_map"):
        rasterize(read_annotations(path), {"tumor": 1}, (100, 100), 1.0)
    path = _geojson(tmp_path / "b.geojson", [("Tumor", [[[0, 0], [500, 0], [500, 50], [0, 0]]])])
    with pytest.raises(AnnotationError, match="outside the slide \\(100x80 px"):
        rasterize(read_annotations(path), {"tumor": 1}, (100, 80), 1.0)
    bad = tmp_path / "c.xml"
    bad.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(AnnotationError, match="cannot read ASAP XML"):
        read_annotations(bad)
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        read_annotations(tmp_path / "d.csv")


SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture
def slide():
    if not SLIDE.is_file():
        pytest.skip(f"real slide not found at {SLIDE} (shared data beside the checkout)")
    return SLIDE


def test_slide_with_annotations_is_read_at_model_mpp(slide, tmp_path):
    # CMU-1-Small-Region: 2220 x 2967 px at 0.499 um/px -> about 1108 x 1480 px at 1 um/px
    ann = _geojson(tmp_path / "s.geojson",
                   [("tumour", [[[200, 400], [1200, 400], [1200, 1400], [200, 1400], [200, 400]]])])
    item = load_slide_item({"slide": str(slide), "annotations": str(ann)}, model_mpp=1.0,
                           annotation="sparse", class_map={"tumour": 1})
    try:
        assert item.labels.shape == (round(2967 * 0.499), round(2220 * 0.499))
        rows, cols = np.nonzero(item.labels)
        assert abs(rows.min() - 400 * 0.499) <= 1 and abs(cols.max() - 1200 * 0.499) <= 1
        img, lab = extract(item, 560, 500, 64)  # tissue in the middle of the region
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and lab.all()
        assert img.std() > 5                      # real tissue, not blank
        # same pixels as a level-0 read (OpenSlide itself, not the reader) downscaled by hand:
        # the 64 px patch spans 64 / 0.499 = 128.3 level-0 px
        with openslide.OpenSlide(str(slide)) as osr:
            l0 = np.asarray(osr.read_region((round(468 / 0.499), round(528 / 0.499)), 0,
                                            (128, 128)))[..., :3].astype(float)
        ref = resize(l0, (64, 64), order=1, preserve_range=True, anti_aliasing=True)
        assert np.abs(img - ref).mean() < 6
        # outside the slide: white, unannotated
        outside = read_region(item, -200, -200, 32)
        assert (outside == 255).all()
    finally:
        item.slide.close()


def test_slide_with_label_raster(slide, tmp_path):
    raster = np.zeros((742, 555), dtype=np.uint8)      # 2 um/px over the slide
    raster[100:200, 50:150] = 7
    imsave(tmp_path / "labels.png", raster, check_contrast=False)
    item = load_slide_item({"slide": str(slide), "labels": str(tmp_path / "labels.png"),
                            "labels_mpp": 2.0}, model_mpp=1.0, annotation="dense",
                           values={7: 2})
    try:
        assert set(np.unique(item.labels)) == {0, 2}
        assert (item.labels == 2).sum() == pytest.approx(200 * 200, rel=0.03)
    finally:
        item.slide.close()
    with pytest.raises(ValueError, match="labels_mpp"):
        load_slide_item({"slide": str(slide), "labels": str(tmp_path / "labels.png")},
                        model_mpp=1.0, annotation="dense")


def _feature(geometry, name="Tumor"):
    return {"type": "Feature", "geometry": geometry,
            "properties": {"classification": {"name": name}}}


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


BAD_GEOJSON = {
    "no coordinates": ({"type": "FeatureCollection",
                        "features": [_feature({"type": "Polygon"})]},
                       "feature 0 \\('Tumor'\\): Polygon has no list of rings"),
    "feature is a number": ({"type": "FeatureCollection", "features": [42]},
                            "feature 0 is 42, not a GeoJSON Feature"),
    "odd number of numbers": ({"type": "FeatureCollection", "features": [_feature(
        {"type": "Polygon", "coordinates": [[[10, 10], [90, 10], [90], [10, 10]]]})]},
                              "feature 0 \\('Tumor'\\): point 2 of a ring is \\[90\\]"),
    "points not pairs": ({"type": "FeatureCollection", "features": [_feature(
        {"type": "Polygon", "coordinates": [[10, 10, 90, 10, 90, 90, 10, 10]]})]},
                         "feature 0 \\('Tumor'\\): point 0 of a ring is 10, not an \\[x, y\\]"),
    "string coordinates": ({"type": "FeatureCollection", "features": [_feature(
        {"type": "MultiPolygon", "coordinates": [[SQUARE], [[["10", "10"], [90, 10], [90, 90],
                                                            [10, 10]]]]}, "Stroma")]},
                           "feature 0 \\('Stroma'\\): point 0 of a ring is \\[\"10\", \"10\"\\]"),
    "features not a list": ({"type": "FeatureCollection", "features": {"a": 1}},
                            "\"features\" is \\{\"a\": 1\\}, not a list"),
    "too few points": ({"type": "FeatureCollection", "features": [_feature(
        {"type": "Polygon", "coordinates": [[[10, 10], [90, 10]]]})]},
                       "feature 0 \\('Tumor'\\): a ring has 2 points, fewer than 3"),
}


@pytest.mark.parametrize("case", BAD_GEOJSON)
def test_malformed_geojson_names_file_and_feature(tmp_path, case):
    data, message = BAD_GEOJSON[case]
    path = _write_json(tmp_path / "bad.geojson", data)
    with pytest.raises(AnnotationError, match=f"bad.geojson: {message}") as e:
        read_annotations(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 10 ** 400])
def test_non_finite_geojson_coordinates_are_refused(tmp_path, bad):
    ring = [[10, 10], [bad, 10], [90, 90], [10, 10]]
    path = _write_json(tmp_path / "n.geojson", _feature({"type": "Polygon", "coordinates": [ring]}))
    with pytest.raises(AnnotationError, match="n.geojson: feature 0 \\('Tumor'\\): .*not a finite"):
        read_annotations(path)


def _asap_text(coordinates):
    return ('<ASAP_Annotations><Annotations><Annotation Name="gland 7" Type="Polygon" '
            'PartOfGroup="tumor"><Coordinates>' + "".join(
                f"<Coordinate {c}/>" for c in coordinates) +
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>")


GOOD = ['Order="0" X="10" Y="10"', 'Order="1" X="90" Y="10"', 'Order="2" X="90" Y="90"']
BAD_ASAP = {
    "letter in a number": ('Order="3" X="12o0" Y="5"', "coordinate 3 has X='12o0', not a finite"),
    "no X": ('Order="3" Y="5"', "coordinate 3 has no X"),
    "nan": ('Order="3" X="10" Y="nan"', "coordinate 3 has Y='nan', not a finite"),
    "infinity": ('Order="3" X="inf" Y="5"', "coordinate 3 has X='inf', not a finite"),
    "bad order": ('Order="x" X="1" Y="5"', "a coordinate has Order='x', not a whole number"),
}


@pytest.mark.parametrize("case", BAD_ASAP)
def test_malformed_asap_names_file_and_annotation(tmp_path, case):
    coordinate, message = BAD_ASAP[case]
    path = tmp_path / "bad.xml"
    path.write_text(_asap_text(GOOD + [coordinate]))
    with pytest.raises(AnnotationError, match=f"bad.xml: annotation 'gland 7': {message}") as e:
        read_annotations(path)
    assert "\n" not in str(e.value)


def test_asap_decimal_comma_and_order_still_read(tmp_path):
    path = tmp_path / "ok.xml"
    path.write_text(_asap_text(['Order="2" X="90,5" Y="90"', 'Order="0" X="10" Y="1.5e1"',
                                'Order="1" X=" 90 " Y="10"']))
    [p] = read_annotations(path)
    assert p.name == "tumor" and p.exterior.tolist() == [[10, 15], [90, 10], [90.5, 90]]


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ASAP_Annotations><Annotations><Annotation Name="&lol9;" Type="Polygon" PartOfGroup="tumor">
<Coordinates><Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="9" Y="1"/>
<Coordinate Order="2" X="9" Y="9"/></Coordinates></Annotation></Annotations></ASAP_Annotations>
"""


def _external_entity(secret):
    return (f'<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>\n'
            + _asap_text(GOOD).replace('PartOfGroup="tumor"', 'PartOfGroup="&xxe;"'))


def test_asap_with_a_dtd_is_refused_before_reading(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("tumor")
    for name, text in (("laughs.xml", BILLION_LAUGHS), ("xxe.xml", _external_entity(secret))):
        (tmp_path / name).write_text(text)
        with pytest.raises(AnnotationError, match=f"{name}: has a <!DOCTYPE> or <!ENTITY> "
                                                  "declaration, which ASAP XML never has") as e:
            read_annotations(tmp_path / name)
        assert "\n" not in str(e.value)
    # an entity reference without a declaration is not expanded either
    (tmp_path / "undeclared.xml").write_text(_asap_text(GOOD).replace("tumor", "&xxe;"))
    with pytest.raises(AnnotationError, match="cannot read ASAP XML \\(undefined entity"):
        read_annotations(tmp_path / "undeclared.xml")


def test_deeply_nested_geojson_is_refused(tmp_path):
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(AnnotationError, match="deep.geojson: GeoJSON nested too deeply"):
        read_annotations(path)
    # nested within the parser's depth, but not points: refused by the shape checks
    deep = [[10, 10]]
    for _ in range(500):
        deep = [deep]
    _write_json(path, _feature({"type": "Polygon", "coordinates": [[deep, [90, 10], [9, 9]]]}))
    with pytest.raises(AnnotationError, match="point 0 of a ring is \\[\\[\\[\\["):
        read_annotations(path)


def test_oversized_annotations_are_refused_before_parsing(tmp_path, monkeypatch):
    from wsiseg_train import annotations

    geojson = _geojson(tmp_path / "big.geojson", [("Tumor", [SQUARE])] * 20)
    xml = _asap(tmp_path / "big.xml", [("tumor", SQUARE)] * 20)
    monkeypatch.setattr(annotations, "MAX_FILE_BYTES", 1024)

    def never(*args, **kwargs):
        raise AssertionError("an oversized file must not be parsed")

    monkeypatch.setattr(annotations.json, "loads", never)
    monkeypatch.setattr(annotations.expat, "ParserCreate", never)
    for path, kind in ((geojson, "GeoJSON"), (xml, "ASAP XML")):
        with pytest.raises(AnnotationError, match=f"{path.name}: [0-9,]+ bytes, over the limit "
                                                  f"of 1,024 for {kind} annotations; split it"):
            read_annotations(path)


def test_too_many_points_are_refused(tmp_path, monkeypatch):
    from wsiseg_train import annotations

    monkeypatch.setattr(annotations, "MAX_VERTICES", 12)
    geojson = _geojson(tmp_path / "many.geojson", [("Tumor", [SQUARE])] * 3)   # 15 points
    xml = _asap(tmp_path / "many.xml", [("tumor", SQUARE)] * 4)               # 16 points
    assert len(read_annotations(_geojson(tmp_path / "few.geojson", [("Tumor", [SQUARE])] * 2)))
    for path in (geojson, xml):
        with pytest.raises(AnnotationError, match="more than 12 polygon points, the limit"):
            read_annotations(path)


DEMO_SLIDE = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"


def _slide_config(tmp_path, annotations):
    item = (f'{{ slide = "{DEMO_SLIDE.as_posix()}", annotations = "{annotations.as_posix()}", '
            'split = "train" }')
    path = tmp_path / "slide.toml"
    path.write_text("\n".join([
        "[model]", 'classes = ["tumour", "other"]', "width = 4", "depth = 3", "border_px = 4",
        "[data]", "patch_px = 32", "val_patches = 2",
        "[[data.sets]]", 'kind = "slide_annotations"', 'annotation = "sparse"',
        f"items = [{item}]", "[data.sets.class_map]", '"tumor" = "tumour"',
        "[train]", "epochs = 1", "iterations = 1", "batch_size = 1", "threads = 1",
        "export = false", ""]))
    return path


@pytest.mark.parametrize("case", ["geojson without coordinates", "ASAP X=12o0", "ASAP nan",
                                  "ASAP billion laughs"])
def test_wsiseg_train_refuses_bad_annotations_in_one_line(tmp_path, case):
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from wsiseg_train.cli import main

    if case.startswith("geojson"):
        bad = _write_json(tmp_path / "bad.geojson", {"type": "FeatureCollection", "features": [
            _feature({"type": "Polygon"})]})
        expected = "bad.geojson: feature 0 ('Tumor'): Polygon has no list of rings"
    elif case == "ASAP billion laughs":
        bad = tmp_path / "bad.xml"
        bad.write_text(BILLION_LAUGHS)
        expected = "bad.xml: has a <!DOCTYPE> or <!ENTITY> declaration"
    else:
        bad = tmp_path / "bad.xml"
        coordinate = 'Order="3" X="12o0" Y="5"' if "12o0" in case else 'Order="3" X="nan" Y="5"'
        bad.write_text(_asap_text(GOOD + [coordinate]))
        expected = "bad.xml: annotation 'gland 7': coordinate 3 has"
    result = CliRunner().invoke(main, ["train", str(_slide_config(tmp_path, bad)),
                                       "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert result.output.startswith("wsiseg-train: error: ") and expected in result.output
    assert not (tmp_path / "run" / "last.pt").exists()
