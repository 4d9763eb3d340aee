"""Calibrate a model's quality-control figures (``wsiseg-train calibrate-qc``).

Writes the ``qc`` key of the model contract (read by :mod:`wsiseg.qc` at every run):

- the stain reference: mean and spread over the training crops of each crop's mean tissue
  colour in CIELAB, and the warning distance: the 95th percentile of the validation crops'
  distances to that reference (at least ``MIN_STAIN_WARN``), so that a slide warns when its
  tissue colour is as far from the training data as only the most unusual validation crops;
- the confidence threshold: the 5th percentile of the top class probability over the
  validation crops' tissue pixels (so 5 % of validation tissue counts as low confidence), and
  the warning share: the 95th percentile of the per-crop low-confidence shares (at least twice
  the overall validation share).

The model runs through :mod:`wsiseg.engine` (the engine's input handling and contract).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.engine import load_model
from wsiseg.qc import ConfidenceTally, stain_lab

from .data import Item
from .evaluate import pad_to_multiple
from .onnx_meta import save_with_metadata

MIN_STAIN_WARN = 2.0
LOW_CONFIDENCE_QUANTILE = 0.05
WARN_QUANTILE = 95


def stain_reference(items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
    means = np.array([m for it in items if (m := stain_lab(it.image)) is not None])
    if len(means) < 2:
        raise ValueError("need at least two training images with stained pixels to calibrate "
                         "the stain reference")
    return means.mean(axis=0), np.maximum(means.std(axis=0), 1.0)


def confidence_figures(model_path: str | Path, items: list[Item]) -> dict[str, float]:
    """Low-confidence threshold (the LOW_CONFIDENCE_QUANTILE of the top class probability of
    validation tissue pixels, as the engine decides it), its share and the warning share."""
    model = load_model(model_path, device="cpu")
    c = model.contract
    tally, per_crop = ConfidenceTally(), []
    for it in items:
        h, w = it.image.shape[:2]
        pred = model.predict(pad_to_multiple(it.image, c.size_multiple)[None])
        crop = ConfidenceTally()
        crop.add(pred.top[0, :h, :w], pred.labels[0, :h, :w] + 1, background=c.background_value)
        tally.hist += crop.hist
        per_crop.append(crop)
    if not tally.hist.sum():
        raise ValueError("the model calls every validation pixel background; nothing to calibrate")
    cdf = np.cumsum(tally.hist) / tally.hist.sum()
    threshold = float(min(255, np.searchsorted(cdf, LOW_CONFIDENCE_QUANTILE) + 1) / 255)
    val_share = tally.share_below(threshold)
    shares = [crop.share_below(threshold) for crop in per_crop if crop.hist.sum()]
    warn = max(float(np.percentile(shares, WARN_QUANTILE)), 2 * val_share)
    return {"confidence_threshold": threshold, "low_confidence_val": val_share,
            "low_confidence_warn": warn}


def calibrate(model_path: str | Path, train: list[Item], val: list[Item]) -> dict[str, Any]:
    """The ``qc`` contract entry for ``model_path`` from training and validation crops."""
    if not train or not val:
        raise ValueError("calibration needs training and validation image pairs")
    mean, std = stain_reference(train)
    dists = [float(np.sqrt((((np.asarray(m) - mean) / std) ** 2).sum()))
             for it in val if (m := stain_lab(it.image)) is not None]
    qc = {"stain_mean": [round(float(v), 3) for v in mean],
          "stain_std": [round(float(v), 3) for v in std],
          "stain_warn": round(max(MIN_STAIN_WARN, float(np.percentile(dists, WARN_QUANTILE))), 3),
          **{k: round(v, 4) for k, v in confidence_figures(model_path, val).items()},
          "train_images": len(train), "val_images": len(val)}
    return qc


def write_qc(model_path: str | Path, qc: dict[str, Any], out: str | Path | None = None) -> Path:
    """Store ``qc`` in the model's metadata (key ``wsiseg.qc``), atomically, in place or at
    ``out``; every other key and the graph stay as they are."""
    import onnx

    from wsiseg.contract import PREFIX

    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props[PREFIX + "qc"] = json.dumps(qc)
    out = Path(out or model_path)
    save_with_metadata(model, props, out)
    load_model(out, device="cpu")  # the result must still pass the engine's checks
    return out
