"""Per-class Dice of an exported ONNX model against reference image/mask pairs.

The model runs through the engine (:func:`wsiseg.engine.load_model`, on the CPU), which checks
it against its contract and feeds it as inference does. Each image is padded (white) to a
multiple of the model's ``size_multiple``, segmented whole, and compared on its labelled pixels.
Classes are matched by name between the model's contract and the config, so a model can be
scored against references with fewer classes: a labelled pixel it calls a class the reference
lacks is a false negative of its reference class. The result also holds the confusion table
(for each reference class, how many of its labelled pixels the model called what).
``compare_onnx`` scores two models on the same items and says how sure their difference is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import Item
from .metrics import confusion, counts_from_confusion, dice_scores, paired_bootstrap

OTHER = "(other)"   # a model class the reference does not have


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """``image`` padded with white at the bottom and right to a multiple of ``multiple``."""
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)


def item_confusions(model_path: str | Path, items: list[Item],
                     class_names: list[str]) -> np.ndarray:
    """``[N, C, C + 1]``: the :func:`~.metrics.confusion` of the model on each item (reference
    classes ``class_names``; column 0: called a class the reference does not have)."""
    from wsiseg.engine import ModelError, load_model

    if not items:
        raise ValueError("no reference items to evaluate on; check the config's sets and --split")
    if any(it.image is None for it in items):
        raise ValueError("evaluate scores image/mask pairs; for slides, segment them with "
                         "`wsiseg segment` and compare the label maps")
    try:
        model = load_model(model_path, device="cpu", head="host")
    except ModelError as e:
        raise ValueError(f"cannot load ONNX model: {e}") from None
    contract = model.contract
    # model output channel k -> reference label value (0 where the reference lacks the class)
    to_ref = np.array([class_names.index(n) + 1 if n in class_names else 0
                       for n in contract.class_names], dtype=np.uint8)
    out = np.zeros((len(items), len(class_names), len(class_names) + 1), dtype=np.int64)
    for k, it in enumerate(items):
        h, w = it.labels.shape
        scores = model.run(pad_to_multiple(it.image, contract.size_multiple)[None])[0, :, :h, :w]
        out[k] = confusion(to_ref[scores.argmax(axis=0)], it.labels, len(class_names))
    return out


def evaluate_onnx(model_path: str | Path, items: list[Item], class_names: list[str]) -> dict:
    """Dice per class (by name) and overall of the model on ``items`` (labels use class_names)."""
    conf = item_confusions(model_path, items, class_names).sum(axis=0)
    counts = counts_from_confusion(conf)
    per, overall = dice_scores(counts)
    called = [OTHER, *class_names]          # confusion columns (column 0: OTHER)
    return {"model": Path(model_path).name, "images": len(items),
            "dice": dict(zip(class_names, per)), "overall_dice": overall,
            "labelled_pixels": {n: int(c) for n, c in
                                zip(class_names, counts[:, 0] + counts[:, 2])},
            # rows: reference classes; columns: what the model called those pixels
            "confusion": {"predicted": called,
                          "pixels": {n: dict(zip(called, map(int, row)))
                                     for n, row in zip(class_names, conf)}}}


def compare_onnx(model_a: str | Path, model_b: str | Path, items: list[Item],
                 class_names: list[str], resamples: int = 2000, seed: int = 0) -> dict:
    """Dice of two models on the same items, and how sure their difference is (a paired
    bootstrap over the items, :func:`~.metrics.paired_bootstrap`)."""
    conf_a = item_confusions(model_a, items, class_names)
    conf_b = item_confusions(model_b, items, class_names)
    boot = paired_bootstrap(conf_a, conf_b, resamples, seed)
    keys = ("a", "b", "diff", "low", "high", "b_better")
    return {"a": Path(model_a).name, "b": Path(model_b).name, "images": len(items),
            "resamples": resamples, "seed": seed,
            "rows": [{"class": n, **{k: boot[k][i] for k in keys}}
                     for i, n in enumerate([*class_names, "overall"])]}


def compare_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"A = {result['a']}, B = {result['b']}: {result['images']} images, paired "
             f"bootstrap over the images ({result['resamples']} draws)",
             f"  {'class':<24}{'A':>8}{'B':>8}{'B - A':>9}   95 % interval      B higher in"]
    for r in result["rows"]:
        lines.append(f"  {r['class']:<24}{r['a']:>8.4f}{r['b']:>8.4f}{r['diff']:>+9.4f}   "
                     f"[{r['low']:+.4f}, {r['high']:+.4f}]   {r['b_better']:.0%} of draws")
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{result['model']}: {result['images']} images"]
    for name, d in result["dice"].items():
        lines.append(f"  {name:<24} Dice {d:.3f}  ({result['labelled_pixels'][name]} px)")
    lines.append(f"  {'overall':<24} Dice {result['overall_dice']:.3f}")
    conf = result.get("confusion")
    if conf:
        cols = [c for c in conf["predicted"]
                if c != OTHER or any(row[c] for row in conf["pixels"].values())]
        lines.append("  share of each reference class's labelled pixels called (columns):")
        lines.append("  " + " " * 24 + "".join(f"{c[:11]:>12}" for c in cols))
        for name, row in conf["pixels"].items():
            n = sum(row.values())
            if n:
                lines.append(f"  {name:<24}" + "".join(f"{row[c] / n:>12.3f}" for c in cols))
    return lines
