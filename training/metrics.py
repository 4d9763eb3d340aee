"""Dice per class on labelled pixels, and the run's metrics log (CSV, JSON, PNG plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsiseg.files import atomic_path, write_bytes_atomic


def confusion(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes + 1]`` pixel counts: row ``t - 1`` holds the labelled pixels of
    reference class ``t`` (1..C), column ``p`` those predicted as ``p`` (column 0: predicted as
    something outside classes 1..C, e.g. a model class the reference does not have).

    Only labelled pixels (labels > 0) count, so sparse references are scored where annotated.
    """
    valid = labels > 0
    p, t = pred[valid].astype(np.int64), labels[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() > n_classes or t.max() > n_classes):
        raise ValueError(f"labels and predictions must lie in 0..{n_classes}")
    conf = np.bincount(t * (n_classes + 1) + p, minlength=(n_classes + 1) ** 2)
    return conf.reshape(n_classes + 1, n_classes + 1)[1:]


def dice_counts(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, 3]`` true positives, false positives, false negatives of classes 1..C.

    Only labelled pixels (labels > 0) count, so sparse references are scored where annotated; a
    labelled pixel predicted as 0 (a class outside 1..C) is a false negative of its class.
    """
    return counts_from_confusion(confusion(pred, labels, n_classes))


def counts_from_confusion(conf: np.ndarray) -> np.ndarray:
    """``[C, 3]`` true positives, false positives, false negatives from a :func:`confusion`."""
    tp = np.diag(conf[:, 1:])
    return np.stack([tp, conf[:, 1:].sum(axis=0) - tp, conf.sum(axis=1) - tp], axis=1)


def dice_scores(counts: np.ndarray) -> tuple[list[float], float]:
    """Per-class Dice (NaN where the class is absent from reference and prediction) and overall
    Dice = mean over the classes present in the reference."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    per = [float(2 * a / d) if d else math.nan for a, d in zip(tp, denom)]
    present = [d for d, ref in zip(per, tp + fn) if ref > 0]
    return per, float(np.mean(present)) if present else math.nan


def paired_bootstrap(conf_a: np.ndarray, conf_b: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """How sure a Dice difference between two models on the same items is.

    ``conf_a``, ``conf_b``: ``[N, C, C + 1]`` per-item :func:`confusion` counts of models A and
    B on the same N items. The items are resampled with replacement (the same draw for both
    models: a paired bootstrap), the Dice pooled over each draw as :func:`dice_scores` does,
    and B - A recorded per class and overall. Returns ``a`` and ``b`` (each model's Dice on all
    items), ``diff`` (B - A on all items), ``low`` /
    ``high`` (the 2.5th / 97.5th percentiles of the resampled differences), ``b_better`` (the
    share of draws in which B's Dice is higher) — each a list of C per-class values then the
    overall one (NaN where a class is absent) — and ``resamples``."""
    conf_a, conf_b = np.asarray(conf_a), np.asarray(conf_b)
    if conf_a.shape != conf_b.shape or conf_a.ndim != 3 or not len(conf_a):
        raise ValueError(f"need per-item confusions of the same items, [N, C, C + 1]; got "
                         f"{conf_a.shape} and {conf_b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")

    def scores(conf: np.ndarray) -> np.ndarray:
        per, overall = dice_scores(counts_from_confusion(conf))
        return np.array([*per, overall])

    a, b = scores(conf_a.sum(0)), scores(conf_b.sum(0))
    diff = b - a
    rng = np.random.default_rng(seed)
    n = len(conf_a)
    draws = np.empty((resamples, diff.size))
    for r in range(resamples):
        i = rng.integers(0, n, n)
        draws[r] = scores(conf_b[i].sum(0)) - scores(conf_a[i].sum(0))
    low, high, better = [], [], []
    for k in range(diff.size):
        col = draws[:, k][np.isfinite(draws[:, k])]
        low.append(float(np.percentile(col, 2.5)) if col.size else math.nan)
        high.append(float(np.percentile(col, 97.5)) if col.size else math.nan)
        better.append(float(np.mean(col > 0)) if col.size else math.nan)
    return {"a": a.tolist(), "b": b.tolist(), "diff": diff.tolist(), "low": low, "high": high,
            "b_better": better, "resamples": resamples}


def write_log(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.csv and metrics.json (one record per epoch) and plot.png."""
    if not history:
        return
    keys = list(history[0])
    rows = [",".join(keys)] + [",".join(_fmt(h.get(k)) for k in keys) for h in history]
    write_bytes_atomic(run_dir / "metrics.csv", ("\n".join(rows) + "\n").encode())
    write_bytes_atomic(run_dir / "metrics.json", json.dumps(list(history), indent=1).encode())
    plot(history, run_dir / "plot.png")


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: list[tuple[str, list[float], tuple[int, int, int]]], lo: float | None = None,
           hi: float | None = None) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    values = [v for _, s, _ in series for v in s if math.isfinite(v)]
    lo = min(values, default=0.0) if lo is None else lo
    hi = max(values, default=1.0) if hi is None else hi
    hi = hi if hi > lo else lo + 1.0
    draw.text((x0 + 4, y0 - 14), f"{title}  [{lo:.3g} .. {hi:.3g}]", fill=(0, 0, 0))
    for k, (name, s, color) in enumerate(series):
        n = len(s)
        pts = [(x0 + (x1 - x0) * (i / max(n - 1, 1)), y1 - (y1 - y0) * (v - lo) / (hi - lo))
               for i, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)
        draw.text((x1 - 90, y0 + 4 + 12 * k), name, fill=color)


def plot(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss (train, val) and Dice (val) per epoch as a PNG (Pillow only)."""
    img = Image.new("RGB", (640, 480), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    get = lambda k: [float(h[k]) for h in history]  # noqa: E731
    _panel(draw, (50, 25, 620, 215), "loss per epoch",
           [("train", get("train_loss"), (31, 119, 180)), ("val", get("val_loss"), (214, 39, 40))])
    _panel(draw, (50, 265, 620, 455), "validation Dice per epoch",
           [("overall", get("val_dice"), (44, 160, 44))], 0.0, 1.0)
    draw.text((50, 462), f"epochs 1..{len(history)}", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
