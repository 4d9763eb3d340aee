"""Tissue detection on a low-resolution thumbnail.

H&E-stained tissue is coloured (pink to purple); glass, unscanned areas and most dust are white
or grey. A pixel is tissue when it was scanned (alpha > 0) and its saturation or darkness is
above a threshold; the mask is then cleaned with size thresholds in physical units (µm²), so
the same settings mean the same thing at any thumbnail resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import morphology


@dataclass(frozen=True)
class TissueParams:
    min_saturation: float = 0.07  # HSV saturation (0-1) above which a pixel is stained
    max_gray: float = 0.30  # gray level (0-1) below which a pixel is tissue whatever its colour
    min_tissue_um2: float = 20_000.0  # drop specks smaller than this (0.02 mm²)
    min_hole_um2: float = 50_000.0  # fill holes smaller than this (lumina, tears)
    margin_um: float = 32.0  # grow the mask so tissue edges are analysed


def tissue_mask(rgb: np.ndarray, scanned: np.ndarray, *, mpp: float,
                params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of a thumbnail ``rgb`` (h, w, 3) uint8 taken at ``mpp`` µm/px."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"thumbnail must be (h, w, 3) RGB, got shape {rgb.shape}")
    mask = np.empty(rgb.shape[:2], bool)
    for r in range(0, rgb.shape[0], 512):  # float32 in strips: a big thumbnail stays cheap
        px = rgb[r:r + 512].astype(np.float32) / 255.0
        hi, lo = px.max(axis=2), px.min(axis=2)
        sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)  # HSV saturation
        gray = hi * (1 - sat / 2)  # darkness that does not reward saturation
        mask[r:r + 512] = (sat > params.min_saturation) | (gray < params.max_gray)
    mask &= scanned
    px_area_um2 = mpp * mpp
    mask = morphology.remove_small_objects(
        mask, max_size=max(0, int(params.min_tissue_um2 / px_area_um2) - 1))
    mask = morphology.remove_small_holes(
        mask, max_size=max(0, int(params.min_hole_um2 / px_area_um2) - 1))
    radius = int(round(params.margin_um / mpp))
    if radius > 0:
        mask = morphology.dilation(mask, morphology.disk(radius)) & scanned
    return mask


def area_mm2(mask: np.ndarray, *, mpp: float) -> float:
    return float(np.count_nonzero(mask)) * mpp * mpp / 1e6
