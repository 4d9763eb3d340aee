"""Per-class areas and tissue fractions of a label map (its CSV row: ``wsiseg.report``).

Label maps follow the model contract: 0 = not analysed, ``k + 1`` = class ``k``. A whole
slide at 1 um/px is far too large to measure at full resolution for a report, so every
function here accepts a reduced map (a pyramid level, ``mpp * 2**k``) or reduces one with
``wsiseg.labels.downsample_labels``, whose nearest-neighbour reduction keeps areas and fractions
unbiased.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .labels import check_labels, check_mpp, count_values


@dataclass(frozen=True)
class ClassArea:
    value: int
    name: str
    pixels: int
    area_mm2: float
    fraction_of_tissue: float | None  # None when the map holds no tissue


@dataclass(frozen=True)
class ClassStats:
    """Areas of one label map; fractions are of tissue = analysed pixels that are not background."""

    mpp: float
    shape_px: tuple[int, int]
    analysed_mm2: float
    tissue_mm2: float
    background_values: tuple[int, ...]
    classes: tuple[ClassArea, ...]
    unknown_pixels: int  # pixels whose value is above the number of classes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape_px"] = list(self.shape_px)
        d["background_values"] = list(self.background_values)
        d["classes"] = [asdict(c) for c in self.classes]
        return d


def class_stats(labels: np.ndarray, *, mpp: float, class_names: Sequence[str],
                background_values: Sequence[int] = ()) -> ClassStats:
    """Area (mm2) and fraction of tissue of every class of ``class_names`` (value k+1 = name k).

    ``mpp`` is the map's own resolution (already multiplied by any downsampling). Area is
    ``pixels * mpp**2 / 1e6``. Tissue is every analysed pixel (value > 0) whose value is not
    in ``background_values``; background classes get a fraction of None.
    """
    labels = check_labels(labels)
    counts = count_values(labels, len(class_names) + 1)
    return class_stats_from_counts(counts, mpp=mpp, class_names=class_names,
                                   background_values=background_values,
                                   shape_px=(int(labels.shape[0]), int(labels.shape[1])))


def class_stats_from_counts(counts: Sequence[int], *, mpp: float, class_names: Sequence[str],
                            shape_px: tuple[int, int],
                            background_values: Sequence[int] = ()) -> ClassStats:
    """:func:`class_stats` from pixel counts of values 0..len(class_names) of a map of
    ``shape_px`` (e.g. counted tile by tile from the full-resolution map file)."""
    mpp = check_mpp(mpp)
    n = len(class_names)
    if n < 1:
        raise ValueError("class statistics need at least one class name")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (n + 1,):
        raise ValueError(f"expected counts of the {n + 1} values 0..{n}, got {counts.shape}")
    background = tuple(int(v) for v in background_values)
    for v in background:
        if not 1 <= v <= n:
            raise ValueError(f"background value {v} is not a class value 1..{n}")
    unknown = int(shape_px[0]) * int(shape_px[1]) - int(counts.sum())
    if unknown < 0:
        raise ValueError(f"counts add up to {int(counts.sum())} pixels, more than a "
                         f"{shape_px[0]} x {shape_px[1]} map holds")
    px_mm2 = mpp * mpp / 1e6
    analysed_px = int(counts[1:].sum())
    tissue_px = analysed_px - int(sum(counts[v] for v in set(background)))
    classes = tuple(
        ClassArea(value=k + 1, name=str(name), pixels=int(counts[k + 1]),
                  area_mm2=float(counts[k + 1]) * px_mm2,
                  fraction_of_tissue=(None if (k + 1) in background or tissue_px == 0
                                      else float(counts[k + 1]) / tissue_px))
        for k, name in enumerate(class_names))
    return ClassStats(mpp=mpp, shape_px=(int(shape_px[0]), int(shape_px[1])),
                      analysed_mm2=analysed_px * px_mm2, tissue_mm2=tissue_px * px_mm2,
                      background_values=background, classes=classes, unknown_pixels=unknown)
