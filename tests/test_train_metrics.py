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
