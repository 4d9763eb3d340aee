import json

import numpy as np
import pytest

from wsiseg.contract import paper_contract
from wsiseg.tsr import (
    NO_DATA,
    TSRConfig,
    field_kernels,
    measure_tsr,
    measure_tsr_with_contract,
    tsr_lut,
    tsr_value,
)

TUMOUR, STROMA, FAT, BACKGROUND = 1, 2, 3, 4
NAMES = ["tumour", "stroma", "fat", "background"]
ROLES = dict(tumour_values=[TUMOUR], stroma_values=[STROMA], background_values=[BACKGROUND],
             class_names=NAMES)


def paint_field(labels, centre, stroma_r2_max):
    """Radius-5 disk (81 px): fat centre, stroma for 1 <= r2 <= stroma_r2_max, tumour outside.

    Stroma pixels by squared distance: r2 = 1, 2, 4, 5, 8 -> 24 px; up to 17 -> 56 px. The
    tumour is an outer ring, so every sector has tumour.
    """
    r0, c0 = centre
    dr, dc = np.mgrid[-5:6, -5:6]
    r2 = dr * dr + dc * dc
    patch = labels[r0 - 5:r0 + 6, c0 - 5:c0 + 6]
    patch[r2 <= 25] = TUMOUR
    patch[(r2 >= 1) & (r2 <= stroma_r2_max)] = STROMA
    patch[5, 5] = FAT


# 10 um/px, 100 um fields (radius 5 px); fill >= 90 % keeps only exactly centred fields.
FIELD_CFG = TSRConfig(grid_um=10, field_diameter_um=100, bulk_closing_um=0, bulk_margin_um=50,
                      min_fill_fraction=0.9)


def two_fields():
    labels = np.zeros((40, 60), np.uint8)
    paint_field(labels, (20, 15), 8)    # 24 stroma / 80 -> 30 %
    paint_field(labels, (20, 45), 17)   # 56 stroma / 80 -> 70 %
    return labels


def test_kernels_partition_the_disk_into_rotated_sectors():
    disk, sectors = field_kernels(5)
    assert disk.sum() == 81
    assert field_kernels(5, 0.5)[1].sum(axis=(1, 2)).tolist() == [15, 15, 15, 15]  # r2 >= 6.25
    assert sectors.sum(axis=(1, 2)).tolist() == [20, 20, 20, 20]
    assert (sectors.sum(0) + (np.arange(121).reshape(11, 11) == 60) == disk).all()
    n, e, s, w = sectors
    assert n[0, 5] and e[5, 10] and s[10, 5] and w[5, 0]  # up, right, down, left in (row, col)
    assert (np.rot90(e) == n).all() and (np.rot90(n) == w).all() and (np.rot90(w) == s).all()


def test_30_70_layout_gives_30_and_70_and_distribution():
    res = measure_tsr(two_fields(), mpp=10.0, config=FIELD_CFG, **ROLES)
    assert res.grid_mpp == 10.0
    assert res.fields.count == 2
    assert (res.fields.min_pct, res.fields.median_pct, res.fields.max_pct) == (30.0, 50.0, 70.0)
    assert res.fields.centres_mm2 == pytest.approx(2 * 1e-4)
    hot = res.hotspot
    assert hot.tsr_pct == 70.0 and hot.score_pct == 70 and hot.category == "stroma-high"
    assert (hot.grid_row, hot.grid_col) == (20, 45)
    assert (hot.centre_row_um, hot.centre_col_um) == (205.0, 455.0)
    assert type(hot.centre_row_um) is float and type(hot.grid_col) is int  # plain JSON types
    assert hot.stroma_mm2 == pytest.approx(56e-4) and hot.tumour_mm2 == pytest.approx(24e-4)
    assert res.hotspot_reason is None
    # the whole tumour holds both fields: 80 stroma / 160 px; exactly 50 % is stroma-low
    assert res.whole.tsr_pct == 50.0 and res.whole.category == "stroma-low"
    assert res.whole.score_pct == 50
    assert res.tsr_map.dtype == np.uint8 and res.tsr_map.shape == (40, 60)
    assert res.tsr_map[20, 15] == 30 and res.tsr_map[20, 45] == 70
    assert (res.tsr_map == NO_DATA).sum() == 40 * 60 - 2
    assert res.tumour_classes == ("tumour",) and res.stroma_classes == ("stroma",)


def test_a_finer_map_is_reduced_to_the_grid_with_the_same_answer():
    fine = np.kron(two_fields(), np.ones((4, 4), np.uint8))
    res = measure_tsr(fine, mpp=2.5, config=FIELD_CFG, **ROLES)
    assert res.grid_mpp == 10.0 and res.map_mpp == 2.5 and res.tsr_map.shape == (40, 60)
    assert res.hotspot.tsr_pct == 70.0
    assert (res.hotspot.centre_row_px, res.hotspot.centre_col_px) == (82.0, 182.0)


def four_sided_field(sides="NESW", w_blob=(3, 3), w_centre=(20, 12)):
    labels = np.zeros((41, 41), np.uint8)
    dr, dc = np.mgrid[-20:21, -20:21]
    labels[dr * dr + dc * dc <= 15 * 15] = STROMA
    blobs = {"N": (12, 20), "E": (20, 28), "S": (28, 20), "W": w_centre}
    for side in sides:
        r, c = blobs[side]
        h, w = w_blob if side == "W" else (3, 3)
        labels[r - h // 2:r - h // 2 + h, c - w // 2:c - w // 2 + w] = TUMOUR
    return labels


# radius 10 px fields, one field centred at (20, 20): tumour blobs 8 px N, E, S and W of it
SIDE_CFG = TSRConfig(grid_um=10, field_diameter_um=200, bulk_closing_um=0, bulk_margin_um=100)


def test_tumour_on_all_four_sides_is_eligible():
    res = measure_tsr(four_sided_field(), mpp=10.0, config=SIDE_CFG, **ROLES)
    assert res.tsr_map[20, 20] != NO_DATA
    assert res.hotspot is not None and res.fields.count >= 1


@pytest.mark.parametrize("missing", list("NESW"))
def test_a_field_with_tumour_on_three_sides_only_is_rejected(missing):
    labels = four_sided_field(sides="NESW".replace(missing, ""))
    res = measure_tsr(labels, mpp=10.0, config=SIDE_CFG, **ROLES)
    assert res.tsr_map[20, 20] == NO_DATA


def test_sector_minimum_tumour():
    labels = four_sided_field(w_blob=(1, 1))  # one tumour pixel on the west side
    # sector of a radius-10 disk beyond radius 5: 62 px; 2 % -> at least 2 px
    assert measure_tsr(labels, mpp=10.0, config=SIDE_CFG, **ROLES).tsr_map[20, 20] == NO_DATA
    loose = TSRConfig(**{**SIDE_CFG.__dict__, "min_sector_tumour_fraction": 0.0})
    assert measure_tsr(labels, mpp=10.0, config=loose, **ROLES).tsr_map[20, 20] != NO_DATA


def test_tumour_must_lie_in_the_border_zone_of_each_side():
    labels = four_sided_field(w_centre=(20, 17))  # west tumour 2-4 px from the centre (r = 10)
    assert measure_tsr(labels, mpp=10.0, config=SIDE_CFG, **ROLES).tsr_map[20, 20] == NO_DATA
    whole_sector = TSRConfig(**{**SIDE_CFG.__dict__, "sector_inner_radius_fraction": 0.0})
    res = measure_tsr(labels, mpp=10.0, config=whole_sector, **ROLES)
    assert res.tsr_map[20, 20] != NO_DATA


def test_fields_not_filled_with_tumour_and_stroma_are_rejected():
    labels = four_sided_field()
    labels[labels == STROMA] = FAT
    res = measure_tsr(labels, mpp=10.0, config=SIDE_CFG, **ROLES)
    assert res.hotspot is None and res.fields.count == 0 and res.fields.median_pct is None
    assert "four sides" in res.hotspot_reason and "50%" in res.hotspot_reason
    assert res.whole.tsr_pct == 0.0  # tumour but no stroma: a real 0 %
    assert (res.tsr_map == NO_DATA).all()


def block_map():
    labels = np.full((40, 40), STROMA, np.uint8)
    labels[15:25, 15:25] = TUMOUR  # 100 px
    return labels


@pytest.mark.parametrize("margin_um, stroma_px", [(0, 0), (20, 84), (30, 136)])
def test_bulk_margin(margin_um, stroma_px):
    # margin m px around a 10 x 10 block: 4 sides x 10 x m plus the corner pixels within m
    cfg = TSRConfig(grid_um=10, bulk_closing_um=0, bulk_margin_um=margin_um)
    res = measure_tsr(block_map(), mpp=10.0, config=cfg, **ROLES)
    assert res.whole.tumour_mm2 == pytest.approx(100e-4)
    assert res.whole.stroma_mm2 == pytest.approx(stroma_px * 1e-4)
    assert res.whole.tsr_pct == pytest.approx(100 * stroma_px / (100 + stroma_px))
    assert res.bulk_mm2 == pytest.approx((100 + stroma_px) * 1e-4)


def test_bulk_is_cut_to_tissue():
    labels = block_map()
    labels[14, :] = 0  # not analysed: the row above the block (12 px of the 20 um margin)
    labels[25, :] = BACKGROUND  # and background the row below it
    cfg = TSRConfig(grid_um=10, bulk_closing_um=0, bulk_margin_um=20)
    res = measure_tsr(labels, mpp=10.0, config=cfg, **ROLES)
    assert res.whole.stroma_mm2 == pytest.approx((84 - 24) * 1e-4)
    assert not res.bulk[14].any() and not res.bulk[25].any()


def test_closing_bridges_gaps_between_tumour_regions():
    labels = np.full((40, 40), STROMA, np.uint8)
    labels[15:25, 8:18] = TUMOUR
    labels[15:25, 22:32] = TUMOUR  # 4 px (40 um) stroma gap
    open_ = measure_tsr(labels, mpp=10.0, **ROLES,
                        config=TSRConfig(grid_um=10, bulk_closing_um=0, bulk_margin_um=0))
    closed = measure_tsr(labels, mpp=10.0, **ROLES,
                         config=TSRConfig(grid_um=10, bulk_closing_um=30, bulk_margin_um=0))
    assert open_.whole.stroma_mm2 == 0
    assert 0 < closed.whole.stroma_mm2 <= 40e-4
    assert closed.bulk[15:25, 18:22].sum() >= 20 and not closed.bulk[:, :5].any()


@pytest.mark.parametrize("labels, roles, reason", [
    (two_fields(), dict(ROLES, tumour_values=[]), "no tumour class"),
    (two_fields(), dict(ROLES, stroma_values=[]), "no stroma class"),
    (np.where(two_fields() == TUMOUR, STROMA, two_fields()).astype(np.uint8), ROLES,
     "no tumour in the map"),
    (np.zeros((0, 0), np.uint8), ROLES, "empty"),
    (np.zeros((30, 30), np.uint8), ROLES, "no analysed tissue"),
    (np.full((30, 30), BACKGROUND, np.uint8), ROLES, "no analysed tissue"),
])
def test_missing_inputs_give_none_with_a_reason(labels, roles, reason):
    res = measure_tsr(labels, mpp=10.0, config=FIELD_CFG, **roles)
    assert res.whole is None and res.hotspot is None
    assert reason in res.whole_reason and reason in res.hotspot_reason
    assert res.fields.count == 0 and res.fields.max_pct is None
    assert res.tsr_map.shape == labels.shape and (res.tsr_map == NO_DATA).all()
    json.dumps(res.to_dict())


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="mpp"):
        measure_tsr(two_fields(), mpp=None, **ROLES)
    with pytest.raises(ValueError, match="field_diameter_um"):
        TSRConfig(field_diameter_um=0)
    with pytest.raises(ValueError, match="min_fill_fraction"):
        TSRConfig(min_fill_fraction=1.5)


@pytest.mark.parametrize("tumour_px, stroma_px, score, category", [
    (70, 30, 30, "stroma-low"), (69, 31, 40, "stroma-low"), (50, 50, 50, "stroma-low"),
    (49, 51, 60, "stroma-high"), (0, 7, 100, "stroma-high"), (3, 0, 0, "stroma-low"),
    (2, 1, 40, "stroma-low"),
])
def test_score_rounds_up_to_10_percent_and_matches_the_category(tumour_px, stroma_px, score,
                                                                  category):
    v = tsr_value(tumour_px, stroma_px, 1.0)
    assert (v.score_pct, v.category) == (score, category)


def test_contract_roles_and_json_report():
    c = paper_contract()
    labels = np.full((40, 60), c.background_value, np.uint8)
    lab = two_fields()
    labels[lab == TUMOUR] = c.value_of("tumour")
    labels[lab == STROMA] = c.value_of("desmoplastic stroma")
    labels[lab == FAT] = c.value_of("fat")
    res = measure_tsr_with_contract(labels, c, mpp=10.0, config=FIELD_CFG)
    assert res.hotspot.tsr_pct == 70.0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["stroma_classes"] == ["desmoplastic stroma"] and d["tumour_classes"] == ["tumour"]
    assert d["hotspot"]["centre_col_um"] == 455.0 and d["config"]["field_diameter_um"] == 100
    assert d["tsr_map_shape_px"] == [40, 60] and "tsr_map" not in d
    # background is not tissue: the bulk stays inside the painted fields
    assert res.bulk_mm2 == pytest.approx(2 * 81 * 1e-4)


def test_lut():
    lut = tsr_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[NO_DATA].tolist() == [128, 128, 128]
    assert lut[0, 2] > lut[0, 0] and lut[100, 0] > lut[100, 2]  # blue low, red high
    assert len({tuple(x) for x in lut[:101]}) > 90


def test_position_in_a_larger_map_only_shifts_the_hotspot():
    big = np.zeros((200, 300), np.uint8)
    big[100:140, 150:210] = two_fields()
    big[0:10, 0:10] = STROMA  # far from tumour: neither in the bulk nor in an eligible field
    res = measure_tsr(big, mpp=10.0, config=FIELD_CFG, **ROLES)
    assert (res.hotspot.grid_row, res.hotspot.grid_col) == (120, 195)
    assert res.tsr_map[120, 165] == 30 and res.tsr_map[120, 195] == 70
    assert (res.tsr_map != NO_DATA).sum() == 2
    assert res.whole.tsr_pct == 50.0 and res.bulk.shape == big.shape
    assert res.bulk[100:140, 150:210].sum() == 2 * 81 and res.bulk.sum() == 2 * 81
