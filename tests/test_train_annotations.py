"""QuPath GeoJSON and ASAP XML polygons rasterised at the model mpp; slide-backed items."""

import json

import numpy as np
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
        # same pixels as a level-0 read downscaled by hand
        l0 = np.asarray(item.slide.read_region((round(468 / 0.499), round(528 / 0.499)), 0,
                                               (129, 129)))[..., :3].astype(float)
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
