"""Label arrays: checks, pixel counts per value and nearest-neighbour resizing.

A label map follows the model contract: a 2-D integer array, 0 = not analysed, ``k + 1`` =
class ``k``. Everything here works on such arrays whatever produced them (the inference
canvas, a pyramid level of a written map, a training raster), and never mixes class values:
counts are exact, and resizing picks one source pixel per output pixel.

Nearest-neighbour reduction also keeps areas unbiased: each class keeps its expected pixel
share, where a majority vote would shrink small and thin classes. This module needs numpy
only, so that the training package can use it too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_CHUNK_PX = 1 << 20  # pixels counted per bincount call: bounds its int64 temporary to 8 MiB


def check_labels(labels: np.ndarray) -> np.ndarray:
    """Raise ValueError unless ``labels`` is a 2-D integer array (the contract's label map)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a label map must be a 2-D integer array, got {labels.dtype} with "
                         f"shape {labels.shape}")
    return labels


def check_mpp(mpp: Any) -> float:
    """Return ``mpp`` as a float, or raise ValueError if it is not a positive finite number."""
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.floating, np.integer)) \
            or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"the label map needs its resolution as a positive number of um per "
                         f"pixel (mpp), got {mpp!r}; pass the slide's mpp explicitly")
    return float(mpp)


def add_counts(counts: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Add the pixel count of each value ``0 .. len(counts) - 1`` in ``block`` to ``counts``
    (int64, changed in place and returned); larger values are not counted."""
    n = len(counts)
    counts += np.bincount(np.asarray(block).ravel(), minlength=n)[:n]
    return counts


def count_values(labels: Any, n_values: int, *, chunk_px: int | None = None) -> np.ndarray:
    """Pixel count of each value ``0 .. n_values - 1`` (larger values are not counted).

    ``labels`` is a 2-D integer array, or anything 2-D whose row slices ``labels[r0:r1]`` give
    one (a ``wsiseg.canvas.DiskCanvas``); it is read ``chunk_px`` pixels at a time (bincount
    widens to int64, so chunks stay small)."""
    if isinstance(labels, np.ndarray):
        labels = check_labels(labels)
    counts = np.zeros(n_values, dtype=np.int64)
    rows = max(1, (chunk_px or _CHUNK_PX) // max(1, labels.shape[1]))
    for r0 in range(0, labels.shape[0], rows):
        add_counts(counts, labels[r0:r0 + rows])
    return counts


def resize_nearest(a: np.ndarray, shape: tuple[int, int], *,
                   factor: float | None = None) -> np.ndarray:
    """Resize a 2-D array to ``shape`` (rows, cols) by nearest-neighbour sampling.

    Output pixel ``(i, j)`` takes the source pixel under its centre: row
    ``floor((i + 0.5) * factor)``, clipped to the source, where ``factor`` is source pixels per
    output pixel (default: the ratio of the shapes, per axis)."""
    if factor is None:
        rows = (np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0]
        cols = (np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1]
    else:
        rows = (np.arange(shape[0]) + 0.5) * factor
        cols = (np.arange(shape[1]) + 0.5) * factor
    rows = np.minimum(rows.astype(np.intp), a.shape[0] - 1)
    cols = np.minimum(cols.astype(np.intp), a.shape[1] - 1)
    return a[np.ix_(rows, cols)]


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour reduction by an integer ``factor``: one pixel per factor x factor block.

    The output has ``ceil(h / factor) x ceil(w / factor)`` pixels; output pixel ``(i, j)``
    covers input rows ``[i * factor, (i + 1) * factor)`` (and likewise columns) and takes the
    value at the block's centre (``i * factor + factor // 2``, the pixel under the centre that
    :func:`resize_nearest` picks), clipped to the map for the last, partial block. Its mpp is
    ``mpp * factor``.
    """
    labels = check_labels(labels)
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"downsample factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return labels
    h, w = labels.shape
    return resize_nearest(labels, (-(-h // factor), -(-w // factor)), factor=int(factor))
