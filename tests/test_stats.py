import csv
import io
import json

import numpy as np
import pytest

from wsiseg import labels as label_arrays
from wsiseg.contract import paper_contract
from wsiseg.labels import count_values, downsample_labels
from wsiseg.report import csv_header, csv_row
from wsiseg.stats import class_stats

NAMES = ["tumour", "stroma", "background"]


def small_map() -> np.ndarray:
    labels = np.zeros((10, 20), dtype=np.uint8)  # 200 px, 0 = not analysed
    labels[0:5, 0:10] = 1      # 50 px tumour
    labels[5:10, 0:6] = 2      # 30 px stroma
    labels[:, 15:20] = 3       # 50 px background
    return labels


def test_areas_are_count_times_mpp_squared():
    s = class_stats(small_map(), mpp=2.0, class_names=NAMES, background_values=[3])
    px_mm2 = 4.0 / 1e6
    assert [c.pixels for c in s.classes] == [50, 30, 50]
    assert [c.area_mm2 for c in s.classes] == pytest.approx([50 * px_mm2, 30 * px_mm2,
                                                             50 * px_mm2], rel=1e-12)
    assert s.analysed_mm2 == pytest.approx(130 * px_mm2, rel=1e-12)
    assert s.tissue_mm2 == pytest.approx(80 * px_mm2, rel=1e-12)
    assert s.classes[0].fraction_of_tissue == pytest.approx(50 / 80)
    assert s.classes[1].fraction_of_tissue == pytest.approx(30 / 80)
    assert s.classes[2].fraction_of_tissue is None  # background is not tissue
    assert s.unknown_pixels == 0


def test_without_background_all_analysed_pixels_are_tissue():
    s = class_stats(small_map(), mpp=1.0, class_names=NAMES)
    assert s.classes[2].fraction_of_tissue == pytest.approx(50 / 130)


def test_values_beyond_the_classes_are_reported_not_counted():
    labels = small_map()
    labels[0, 0] = 9
    s = class_stats(labels, mpp=1.0, class_names=NAMES)
    assert s.unknown_pixels == 1
    assert s.classes[0].pixels == 49


def test_empty_and_untouched_maps_have_no_fractions():
    for labels in (np.zeros((0, 0), np.uint8), np.zeros((4, 4), np.uint8)):
        s = class_stats(labels, mpp=1.0, class_names=NAMES)
        assert s.tissue_mm2 == 0
        assert all(c.fraction_of_tissue is None and c.area_mm2 == 0 for c in s.classes)


@pytest.mark.parametrize("mpp", [None, 0, -1.0, float("nan"), float("inf"), "1", True])
def test_missing_or_bad_mpp_is_refused_with_a_hint(mpp):
    with pytest.raises(ValueError, match="mpp"):
        class_stats(small_map(), mpp=mpp, class_names=NAMES)


def test_bad_maps_and_roles_are_refused():
    with pytest.raises(ValueError, match="2-D integer"):
        class_stats(np.zeros((2, 2, 3), np.uint8), mpp=1.0, class_names=NAMES)
    with pytest.raises(ValueError, match="2-D integer"):
        class_stats(np.zeros((2, 2), np.float32), mpp=1.0, class_names=NAMES)
    with pytest.raises(ValueError, match="background value 4"):
        class_stats(small_map(), mpp=1.0, class_names=NAMES, background_values=[4])


def test_chunked_counting_matches_bincount(monkeypatch):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(37, 23), dtype=np.uint8)
    monkeypatch.setattr(label_arrays, "_CHUNK_PX", 50)  # 2 rows per chunk
    assert count_values(labels, 6).tolist() == np.bincount(labels.ravel(), minlength=6).tolist()


def test_downsample_takes_block_centres_and_keeps_partial_blocks():
    labels = np.arange(7 * 10, dtype=np.uint16).reshape(7, 10)
    small = downsample_labels(labels, 4)
    assert small.shape == (2, 3)
    assert small[0].tolist() == [labels[2, 2], labels[2, 6], labels[2, 9]]  # last block clipped
    assert small[1, 0] == labels[6, 2]
    assert downsample_labels(labels, 1) is labels
    with pytest.raises(ValueError, match="positive integer"):
        downsample_labels(labels, 0)


def test_downsampling_keeps_block_aligned_areas_exact():
    labels = np.kron(small_map(), np.ones((8, 8), np.uint8))  # every class area x 64
    full = class_stats(labels, mpp=1.0, class_names=NAMES)
    reduced = class_stats(downsample_labels(labels, 8), mpp=8.0, class_names=NAMES)
    assert [c.area_mm2 for c in reduced.classes] == pytest.approx(
        [c.area_mm2 for c in full.classes], rel=1e-12)


def test_to_dict_is_json_and_csv_row_matches_header():
    contract = paper_contract()
    labels = np.zeros((8, 8), np.uint8)
    labels[:4] = contract.value_of("tumour")
    labels[4:] = contract.value_of("desmoplastic stroma")
    s = class_stats(labels, mpp=50.0, class_names=contract.class_names,
                    background_values=[contract.background_value])
    d = json.loads(json.dumps(s.to_dict()))
    assert d["classes"][0]["name"] == "tumour" and d["mpp"] == 50.0

    header = csv_header(contract.class_names)
    row = csv_row("slide-1", s)
    assert len(row) == len(header)
    record = dict(zip(header, row))
    assert record["tumour fraction"] == "0.5000"
    assert record["tumour mm2"] == "0.0800"  # 32 px x 2500 um2
    assert record["background fraction"] == ""
    assert record["tsr_reason"] == "TSR not measured"
    buf = io.StringIO()
    csv.writer(buf).writerows([header, row])
    assert buf.getvalue().splitlines()[1].startswith("slide-1,50,")
    assert len(csv_row("s", s, with_tsr=False)) == len(csv_header(contract.class_names,
                                                                  with_tsr=False))


def test_csv_row_carries_the_tsr_numbers_and_reasons():
    from wsiseg.tsr import TSRConfig, measure_tsr
    labels = np.zeros((40, 40), np.uint8)
    labels[5:35, 5:35] = 2
    labels[10:30, 10:30] = 1
    labels[18:22, 18:22] = 2
    s = class_stats(labels, mpp=10.0, class_names=NAMES, background_values=[3])
    cfg = TSRConfig(grid_um=10, field_diameter_um=100, bulk_closing_um=0, bulk_margin_um=0)
    res = measure_tsr(labels, mpp=10.0, tumour_values=[1], stroma_values=[2], config=cfg)
    record = dict(zip(csv_header(NAMES), csv_row("s", s, res)))
    assert record["tsr_whole_pct"] == "4.0"  # 16 stroma / (384 tumour + 16) in the bulk
    assert float(record["tsr_hotspot_pct"]) == pytest.approx(res.hotspot.tsr_pct, abs=0.05)
    assert record["tsr_category"] == res.hotspot.category and record["tsr_reason"] == ""
    assert int(record["tsr_fields"]) == res.fields.count > 0
    none = measure_tsr(labels, mpp=10.0, tumour_values=[], stroma_values=[2], config=cfg)
    record = dict(zip(csv_header(NAMES), csv_row("s", s, none)))
    assert record["tsr_whole_pct"] == "" and record["tsr_fields"] == "0"
    assert record["tsr_reason"] == "the model names no tumour class"  # said once


def test_stats_from_counts_match_stats_from_the_map():
    from wsiseg.stats import class_stats_from_counts
    labels = small_map()
    labels[0, 0] = 7  # a value beyond the classes
    direct = class_stats(labels, mpp=2.0, class_names=NAMES, background_values=[3])
    counts = np.bincount(labels.ravel(), minlength=8)[:4]
    via = class_stats_from_counts(counts, mpp=2.0, class_names=NAMES, shape_px=labels.shape,
                                  background_values=[3])
    assert via == direct and via.unknown_pixels == 1
    with pytest.raises(ValueError, match="values 0..3"):
        class_stats_from_counts(counts[:3], mpp=2.0, class_names=NAMES, shape_px=(10, 20))
    with pytest.raises(ValueError, match="more than"):
        class_stats_from_counts(counts, mpp=2.0, class_names=NAMES, shape_px=(2, 2))
