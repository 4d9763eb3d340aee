"""Per-class areas and tissue fractions of a label map, and the per-slide CSV row.

Label maps follow the model contract: 0 = not analysed, ``k + 1`` = class ``k``. A whole
slide at 1 um/px is far too large to measure at full resolution for a report, so every
function here accepts a reduced map (a pyramid level, ``mpp * 2**k``) or reduces one with
``wsiseg.labels.downsample_labels``, whose nearest-neighbour reduction keeps areas and fractions
unbiased.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .labels import check_labels, check_mpp, count_values

if TYPE_CHECKING:
    from wsiseg.tsr import TSRResult


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


_TSR_COLUMNS = ("tsr_whole_pct", "tsr_hotspot_pct", "tsr_score_pct", "tsr_category",
                "tsr_fields", "tsr_fields_min_pct", "tsr_fields_median_pct",
                "tsr_fields_max_pct", "tsr_reason")


def csv_header(class_names: Sequence[str], *, with_tsr: bool = True) -> list[str]:
    """Column names of :func:`csv_row`: slide, mpp, areas, per-class mm2 and fraction, TSR."""
    cols = ["slide", "mpp", "analysed_mm2", "tissue_mm2"]
    for name in class_names:
        cols += [f"{name} mm2", f"{name} fraction"]
    return cols + list(_TSR_COLUMNS if with_tsr else ())


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def csv_row(slide: str, stats: ClassStats, tsr: TSRResult | None = None, *,
            with_tsr: bool = True) -> list[str]:
    """One CSV row per slide, matching :func:`csv_header`; empty cells where a value is None.

    Write it with ``csv.writer(f).writerow(...)``. Areas have 4 decimals (0.0001 mm2 = a
    10 x 10 um square), fractions 4, TSR percentages 1.
    """
    row = [slide, f"{stats.mpp:g}", _fmt(stats.analysed_mm2, 4), _fmt(stats.tissue_mm2, 4)]
    for c in stats.classes:
        row += [_fmt(c.area_mm2, 4), _fmt(c.fraction_of_tissue, 4)]
    if not with_tsr:
        return row
    if tsr is None:
        return row + [""] * (len(_TSR_COLUMNS) - 1) + ["TSR not measured"]
    whole, hot, dist = tsr.whole, tsr.hotspot, tsr.fields
    reasons = [r for r in (tsr.whole_reason, tsr.hotspot_reason) if r]
    return row + [
        _fmt(whole.tsr_pct if whole else None, 1),
        _fmt(hot.tsr_pct if hot else None, 1),
        "" if hot is None else str(hot.score_pct),
        "" if hot is None else hot.category,
        str(dist.count),
        _fmt(dist.min_pct, 1), _fmt(dist.median_pct, 1), _fmt(dist.max_pct, 1),
        "; ".join(dict.fromkeys(reasons)),
    ]
