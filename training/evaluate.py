"""Per-class Dice of an exported ONNX model against reference image/mask pairs (ONNX Runtime).

Each image is padded (white) to a multiple of the model's ``size_multiple``, segmented whole,
and compared on its labelled pixels. Classes are matched by name between the model's contract
and the config, so a model can be scored against references with fewer classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.contract import from_metadata

from .data import Item
from .metrics import dice_counts, dice_scores


def _pad_to(image: np.ndarray, multiple: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)


def evaluate_onnx(model_path: str | Path, items: list[Item], class_names: list[str]) -> dict:
    """Dice per class (by name) and overall of the model on ``items`` (labels use class_names)."""
    import onnxruntime as ort

    if not items:
        raise ValueError("no reference items to evaluate on; check the config's sets and --split")
    if any(it.image is None for it in items):
        raise ValueError("evaluate scores image/mask pairs; for slides, segment them with "
                         "`wsiseg segment` and compare the label maps")
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail,
            ort_errors.NoSuchFile) as e:
        raise ValueError(f"cannot load ONNX model {model_path}: {str(e).splitlines()[0]}") from None
    contract = from_metadata(session.get_modelmeta().custom_metadata_map)
    # model output channel k -> reference label value (0 where the reference lacks the class)
    to_ref = np.array([class_names.index(n) + 1 if n in class_names else 0
                       for n in contract.class_names], dtype=np.uint8)
    in_name = session.get_inputs()[0].name
    counts = np.zeros((len(class_names), 3), dtype=np.int64)
    for it in items:
        h, w = it.labels.shape
        x = _pad_to(it.image, contract.size_multiple).transpose(2, 0, 1)[None]
        if contract.input == "float32":
            mean = np.array(contract.mean, dtype=np.float32)[:, None, None]
            std = np.array(contract.std, dtype=np.float32)[:, None, None]
            x = ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        logits = session.run(None, {in_name: np.ascontiguousarray(x)})[0][0, :, :h, :w]
        pred = to_ref[logits.argmax(axis=0)]
        counts += dice_counts(pred, it.labels, len(class_names))
    per, overall = dice_scores(counts)
    return {"model": Path(model_path).name, "images": len(items),
            "dice": dict(zip(class_names, per)), "overall_dice": overall,
            "labelled_pixels": {n: int(c) for n, c in
                                zip(class_names, counts[:, 0] + counts[:, 2])}}


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{result['model']}: {result['images']} images"]
    for name, d in result["dice"].items():
        lines.append(f"  {name:<24} Dice {d:.3f}  ({result['labelled_pixels'][name]} px)")
    lines.append(f"  {'overall':<24} Dice {result['overall_dice']:.3f}")
    return lines
