"""Quality control of one run: how sure the model was, and how far the slide's stain is from
the training data's. Both compare the slide with figures that the model carries in its contract
(``qc`` key, written by ``wsiseg-train calibrate-qc``):

- **confidence**: the share of tissue pixels (those not called background) whose top class
  probability is below ``confidence_threshold``; the threshold and the share on the model's
  validation crops are calibrated, and the run warns above ``low_confidence_warn``;
- **stain**: the mean CIELAB colour of the slide's tissue (on the thumbnail, inside the tissue
  mask) against the mean and spread of the training crops' tissue colours, as a distance in
  spreads (root of the summed squared z-scores); the run warns above ``stain_warn``.

A model without the ``qc`` key gets the measured figures and no warnings (nothing to compare).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.color import rgb2lab

TISSUE_MAX_L = 85.0        # CIELAB lightness below which a thumbnail pixel counts as stained


@dataclass(frozen=True)
class Calibration:
    confidence_threshold: float
    low_confidence_val: float      # share of validation tissue pixels below the threshold
    low_confidence_warn: float     # warn when a slide's share is above this
    stain_mean: tuple[float, float, float]
    stain_std: tuple[float, float, float]
    stain_warn: float              # warn when the stain distance is above this

    @classmethod
    def from_contract(cls, qc: Mapping[str, Any]) -> Calibration | None:
        if not qc:
            return None
        try:
            return cls(float(qc["confidence_threshold"]), float(qc["low_confidence_val"]),
                       float(qc["low_confidence_warn"]),
                       tuple(float(v) for v in qc["stain_mean"]),  # type: ignore[arg-type]
                       tuple(float(v) for v in qc["stain_std"]),   # type: ignore[arg-type]
                       float(qc["stain_warn"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"model contract: qc is incomplete or malformed ({e}); "
                             "recalibrate it with wsiseg-train calibrate-qc") from None


class ConfidenceTally:
    """Histogram of the top class probability (x 255, uint8) of tissue pixels, tile by tile."""

    def __init__(self) -> None:
        self.hist = np.zeros(256, np.int64)

    def add(self, top: np.ndarray, labels: np.ndarray, *, background: int) -> None:
        """``top [h, w]`` uint8 (top probability x 255) of the pixels whose map values are
        ``labels [h, w]``; background pixels are not counted."""
        tissue = top[labels != background] if background else top.ravel()
        self.hist += np.bincount(tissue, minlength=256)

    def share_below(self, threshold: float) -> float:
        """Share of the counted pixels whose top probability is below ``threshold``."""
        n = int(self.hist.sum())
        if not n:
            return math.nan
        return float(self.hist[:u8_below(threshold)].sum() / n)


def u8_below(threshold: float) -> int:
    """The number of uint8 values v (probability x 255) with v / 255 < ``threshold``."""
    return max(0, min(256, math.ceil(threshold * 255 - 1e-6)))


def stain_lab(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, float] | None:
    """Mean CIELAB (L*, a*, b*) of the stained pixels of ``rgb`` (inside ``mask`` if given);
    None when no pixel is stained."""
    lab = rgb2lab(rgb[..., :3])
    keep = lab[..., 0] < TISSUE_MAX_L
    if mask is not None:
        keep &= mask.astype(bool)
    if keep.sum() < 16:
        return None
    return tuple(float(v) for v in lab[keep].mean(axis=0))  # type: ignore[return-value]


def stain_distance(mean: tuple[float, float, float], cal: Calibration) -> float:
    z = (np.asarray(mean) - np.asarray(cal.stain_mean)) / np.asarray(cal.stain_std)
    return float(np.sqrt((z * z).sum()))


def qc_section(qc: Mapping[str, Any], tally: ConfidenceTally | None,
               stain: tuple[float, float, float] | None) -> dict[str, Any]:
    """The report's ``qc`` block: measured figures, the calibration and ``warnings`` (words)."""
    cal = Calibration.from_contract(qc)
    out: dict[str, Any] = {"calibrated": cal is not None, "warnings": []}
    if stain is not None:
        out["stain_lab"] = [round(v, 2) for v in stain]
    if cal is None:
        if tally is not None:
            out["low_confidence_share"] = tally.share_below(0.5)
            out["confidence_threshold"] = 0.5
        return out
    out["confidence_threshold"] = cal.confidence_threshold
    out["low_confidence_warn"] = cal.low_confidence_warn
    out["low_confidence_val"] = cal.low_confidence_val
    out["stain_warn"] = cal.stain_warn
    if tally is not None:
        share = tally.share_below(cal.confidence_threshold)
        out["low_confidence_share"] = share
        if share > cal.low_confidence_warn:
            out["warnings"].append(
                f"low model confidence on {100 * share:.0f}% of the tissue (validation "
                f"{100 * cal.low_confidence_val:.0f}%, warning above "
                f"{100 * cal.low_confidence_warn:.0f}%)")
    if stain is not None:
        d = stain_distance(stain, cal)
        out["stain_distance"] = d
        if d > cal.stain_warn:
            out["warnings"].append(
                f"stain colour far from the training data (distance {d:.1f}, warning above "
                f"{cal.stain_warn:.1f}; tissue L*a*b* {stain[0]:.0f}, {stain[1]:.0f}, "
                f"{stain[2]:.0f} against {cal.stain_mean[0]:.0f}, {cal.stain_mean[1]:.0f}, "
                f"{cal.stain_mean[2]:.0f})")
    return out


def warning_line(qc: Mapping[str, Any]) -> str | None:
    """One line for the terminal, or None when the run raised no warning."""
    w = qc.get("warnings") or []
    if not w:
        return None
    return "QC: " + "; ".join(w) + ": check the classes before using the TSR"


def text_lines(qc: Mapping[str, Any]) -> list[str]:
    """Lines for the preview's legend column."""
    if not qc:
        return []
    lines = []
    if "low_confidence_share" in qc and not math.isnan(qc["low_confidence_share"]):
        lines.append(f"low confidence: {100 * qc['low_confidence_share']:.0f}% of tissue")
    if "stain_distance" in qc:
        lines.append(f"stain distance: {qc['stain_distance']:.1f}")
    lines += [f"QC WARNING: {w}" for w in qc.get("warnings") or []]
    return lines
