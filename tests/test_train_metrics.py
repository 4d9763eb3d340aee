"""Confusion counts and Dice of training/metrics.py, and the confusion table of
``wsiseg-train evaluate`` (training/evaluate.py) through the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx_models import colour_rule_model
from wsiseg_train.data import Item
from wsiseg_train.evaluate import OTHER, evaluate_onnx, summary_lines
from wsiseg_train.metrics import confusion, dice_counts, dice_scores


def test_confusion_and_dice_counts_exact():
    labels = np.array([[1, 1, 1, 2], [2, 2, 0, 0]], np.uint8)     # 0 = unannotated
    pred = np.array([[1, 1, 2, 2], [0, 1, 2, 1]], np.uint8)       # 0 = outside classes 1..2
    conf = confusion(pred, labels, 2)
    #            other  1  2
    assert conf.tolist() == [[0, 2, 1],      # reference 1: two right, one called 2
                             [1, 1, 1]]      # reference 2: one other, one called 1, one right
    # the pixel predicted 0 is a false negative of class 2; unannotated pixels count nowhere
    assert dice_counts(pred, labels, 2).tolist() == [[2, 1, 1], [1, 1, 2]]
    per, overall = dice_scores(dice_counts(pred, labels, 2))
    assert per == pytest.approx([4 / 6, 2 / 5]) and overall == pytest.approx((4 / 6 + 2 / 5) / 2)


def test_confusion_refuses_values_out_of_range():
    with pytest.raises(ValueError, match="0..2"):
        confusion(np.array([3], np.uint8), np.array([1], np.uint8), 2)


def test_dice_of_a_class_absent_everywhere_is_nan():
    per, overall = dice_scores(dice_counts(np.array([1, 1]), np.array([1, 1]), 2))
    assert per[0] == 1.0 and math.isnan(per[1]) and overall == 1.0


def test_evaluate_reports_where_pixels_went_including_classes_the_reference_lacks(tmp_path):
    """Colour-rule model (tumour / stroma / background) scored against a reference without
    stroma: red pixels labelled tumour are called stroma, which the reference lacks; they are
    tumour false negatives and land in the confusion table's "(other)" column."""
    pytest.importorskip("onnxruntime")
    model = colour_rule_model(tmp_path / "m.onnx")
    image = np.full((16, 16, 3), 255, np.uint8)
    image[:8] = (40, 40, 220)        # blue -> tumour
    image[8:12] = (220, 40, 40)      # red -> stroma (not in the reference)
    labels = np.full((16, 16), 2, np.uint8)   # reference: 1 tumour, 2 background
    labels[:12] = 1
    labels[15] = 0                            # one unannotated row
    res = evaluate_onnx(model, [Item("x", labels, image=image)], ["tumour", "background"])
    px = res["confusion"]["pixels"]
    assert res["confusion"]["predicted"] == [OTHER, "tumour", "background"]
    assert px["tumour"] == {OTHER: 64, "tumour": 128, "background": 0}
    assert px["background"] == {OTHER: 0, "tumour": 0, "background": 48}
    assert res["dice"]["tumour"] == pytest.approx(2 * 128 / (2 * 128 + 64))
    assert res["dice"]["background"] == 1.0
    text = "\n".join(summary_lines(res))
    assert "(other)" in text and "0.333" in text   # 64 of 192 tumour pixels


def test_paired_bootstrap_exact_difference_and_interval():
    from wsiseg_train.metrics import paired_bootstrap
    # two items, two classes; B fixes item 0's two class-1 pixels called 2, item 1 is the same
    a = np.array([[[0, 2, 2], [0, 0, 4]],      # item 0: class 1 half right, class 2 right
                  [[0, 4, 0], [0, 1, 3]]])     # item 1: one class-2 pixel called 1
    b = a.copy()
    b[0] = [[0, 4, 0], [0, 0, 4]]
    res = paired_bootstrap(a, b, resamples=500, seed=3)
    # pooled Dice: A class 1 = 2*6/(2*6+1+2), class 2 = 2*7/(2*7+2+1); B: 2*8/17, 2*7/15
    da, db = [12 / 15, 14 / 17], [16 / 17, 14 / 15]
    want = [db[0] - da[0], db[1] - da[1], np.mean(db) - np.mean(da)]
    assert res["diff"] == pytest.approx(want)
    for lo, d, hi in zip(res["low"], res["diff"], res["high"]):
        assert lo <= d + 1e-12 and d <= hi + 1e-12
    # B is never worse in any draw: every drawn difference is >= 0, and > 0 whenever item 0
    # is drawn (all draws but those of item 1 twice, about a quarter)
    assert min(res["low"]) >= 0
    assert 0.6 < res["b_better"][0] < 0.9
    assert paired_bootstrap(a, b, resamples=500, seed=3) == res          # seeded
    same = paired_bootstrap(a, a, resamples=50)
    assert same["diff"] == [0.0, 0.0, 0.0] and same["high"] == [0.0, 0.0, 0.0]
    assert same["b_better"] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b[:1])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(a, b, resamples=0)


def test_compare_scores_two_models_on_the_same_items_through_the_engine(tmp_path):
    """The colour-rule model against a copy whose contract names its stroma and background
    outputs the other way round: B calls red pixels background and white ones stroma."""
    pytest.importorskip("onnxruntime")
    from onnx_models import CLASSES, contract
    from wsiseg_train.evaluate import compare_lines, compare_onnx

    from wsiseg.contract import to_metadata
    a = colour_rule_model(tmp_path / "a.onnx")
    swapped = contract(classes=(CLASSES[0], CLASSES[2], CLASSES[1]))
    b = colour_rule_model(tmp_path / "b.onnx", meta=to_metadata(swapped))
    image = np.full((16, 16, 3), 255, np.uint8)
    image[:6] = (40, 40, 220)        # blue -> tumour
    image[6:11] = (220, 40, 40)      # red -> stroma
    labels = np.full((16, 16), 3, np.uint8)   # 1 tumour, 2 stroma, 3 background
    labels[:6], labels[6:11] = 1, 2
    items = [Item(f"x{k}", labels, image=image) for k in range(3)]
    res = compare_onnx(a, b, items, ["tumour", "stroma", "background"], resamples=100)
    rows = {r["class"]: r for r in res["rows"]}
    assert [rows[n]["a"] for n in ("tumour", "stroma", "background")] == [1.0, 1.0, 1.0]
    assert [rows[n]["b"] for n in ("tumour", "stroma", "background")] == [1.0, 0.0, 0.0]
    assert rows["overall"]["diff"] == pytest.approx(-2 / 3)
    # identical items: every draw gives the same difference
    assert rows["stroma"]["low"] == rows["stroma"]["high"] == -1.0
    assert rows["tumour"]["b_better"] == 0.0
    text = "\n".join(compare_lines(res))
    assert "a.onnx" in text and "-1.0000" in text and "3 images" in text
