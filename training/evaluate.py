"""Per-class Dice of an exported ONNX model against reference image/mask pairs.

The model runs through the engine (:func:`wsiseg.engine.load_model`, on the CPU), which checks
it against its contract and feeds it as inference does. Each image is padded (white) to a
multiple of the model's ``size_multiple``, segmented whole, and compared on its labelled pixels.
Classes are matched by name between the model's contract and the config, so a model can be
scored against references with fewer classes: a labelled pixel it calls a class the reference
lacks is a false negative of its reference class. The result also holds the confusion table
(for each reference class, how many of its labelled pixels the model called what)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import Item
from .metrics import confusion, counts_from_confusion, dice_scores

OTHER = "(other)"   # a model class the reference does not have


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """``image`` padded with white at the bottom and right to a multiple of ``multiple``."""
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)


def evaluate_onnx(model_path: str | Path, items: list[Item], class_names: list[str]) -> dict:
    """Dice per class (by name) and overall of the model on ``items`` (labels use class_names)."""
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
    conf = np.zeros((len(class_names), len(class_names) + 1), dtype=np.int64)
    for it in items:
        h, w = it.labels.shape
        scores = model.run(pad_to_multiple(it.image, contract.size_multiple)[None])[0, :, :h, :w]
        pred = to_ref[scores.argmax(axis=0)]
        conf += confusion(pred, it.labels, len(class_names))
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
