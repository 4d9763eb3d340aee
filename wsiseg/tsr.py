"""Tumour-stroma ratio (TSR = stroma / (stroma + tumour) area) measured on a label map.

Three measurements, all from the classes the model contract names as tumour and as stroma
(so only tumour-associated stroma counts, not muscle or lamina propria):

* whole-tumour TSR: inside the tumour bulk. The bulk is a morphological closing of the
  tumour mask (a disk of ``bulk_closing_um``), holes filled, grown by ``bulk_margin_um`` and
  cut to tissue. A closing behaves like a concave hull whose concavities narrower than the
  disk are filled: it bridges the stroma between tumour glands but, unlike a convex hull,
  does not swallow the healthy tissue inside a C-shaped or crescent tumour.
* hot-spot TSR: the most stroma-rich circular field (clinical practice: a ~2 mm field with
  tumour on all four sides). A field is eligible when tumour + stroma cover at least
  ``min_fill_fraction`` of it, tumour lies on all four sides: each 90-degree sector (N, E,
  S, W), taken beyond ``sector_inner_radius_fraction`` of the radius (the field's border
  zone, where clinical scoring looks for tumour cells), holds at least
  ``min_sector_tumour_fraction`` of its area in tumour; and (optionally) its centre lies in
  the bulk.
* the distribution of field TSRs over all eligible centres, and a TSR map: the local TSR of
  the field centred on each pixel of the working grid.

All fields are evaluated at once: counts inside a disk (and inside each sector) for every
centre are correlations with binary kernels, done by FFT and rounded back to exact integer
pixel counts. Everything runs on a coarse working grid (``grid_um``, default 32 um/px): a
50k x 50k map at 1 um/px becomes 1.6k x 1.6k, and a 2.2 mm field is still a disk of ~3700
pixels.

The clinical score is the TSR rounded *up* to the next 10 % step (30.0 -> 30, 30.1 -> 40).
Rounding up keeps the score consistent with the category: stroma-high (TSR > 50 %) is exactly
a score of 60 % or more. Nearest rounding would label 54 % stroma-high with a score of 50 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from .labels import check_labels, check_mpp, downsample_labels

NO_DATA = 255  # TSR map value where the field is not eligible


@dataclass(frozen=True)
class TSRConfig:
    grid_um: float = 32.0                   # working grid; a finer map is reduced to it
    field_diameter_um: float = 2200.0       # published automated TSR: 2.2 mm circle (~10x field)
    bulk_closing_um: float = 500.0          # bridges tumour gaps narrower than ~1 mm
    bulk_margin_um: float = 250.0           # buffer around the tumour, as in published work
    min_fill_fraction: float = 0.5          # tumour + stroma must be most of the field
    min_sector_tumour_fraction: float = 0.02  # per N/E/S/W sector: a few glands, not a speck
    sector_inner_radius_fraction: float = 0.5  # sectors cover the outer 3/4 of the field area
    require_centre_in_bulk: bool = True

    def __post_init__(self) -> None:
        for name in ("grid_um", "field_diameter_um"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TSRConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("bulk_closing_um", "bulk_margin_um"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TSRConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_fill_fraction", "min_sector_tumour_fraction",
                     "sector_inner_radius_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TSRConfig.{name} must be within 0..1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TSRValue:
    tumour_mm2: float
    stroma_mm2: float
    tsr_pct: float     # 100 * stroma / (stroma + tumour)
    score_pct: int     # clinical score: tsr_pct rounded up to a multiple of 10
    category: str      # "stroma-high" if tsr_pct > 50 else "stroma-low"


@dataclass(frozen=True)
class Hotspot(TSRValue):
    diameter_um: float = 0.0
    centre_row_um: float = 0.0   # from the map's top-left corner (pixel i spans [i, i+1) px)
    centre_col_um: float = 0.0
    centre_row_px: float = 0.0   # same point in pixels of the input map (its level 0)
    centre_col_px: float = 0.0
    grid_row: int = 0            # pixel of the TSR map (working grid)
    grid_col: int = 0


@dataclass(frozen=True)
class FieldDistribution:
    count: int                # eligible field centres on the working grid (fields overlap)
    centres_mm2: float        # area covered by those centres
    min_pct: float | None
    median_pct: float | None
    max_pct: float | None


@dataclass(frozen=True)
class TSRResult:
    tumour_classes: tuple[str, ...]
    stroma_classes: tuple[str, ...]
    map_mpp: float
    grid_mpp: float
    bulk_mm2: float
    whole: TSRValue | None
    whole_reason: str | None
    hotspot: Hotspot | None
    hotspot_reason: str | None
    fields: FieldDistribution
    config: TSRConfig
    # Arrays on the working grid (grid_mpp): local TSR 0-100, NO_DATA where not eligible;
    # and the tumour bulk. Not part of to_dict().
    tsr_map: np.ndarray = field(repr=False, compare=False)
    bulk: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("tsr_map", "bulk")}
        d["tumour_classes"] = list(self.tumour_classes)
        d["stroma_classes"] = list(self.stroma_classes)
        d["tsr_map_shape_px"] = list(self.tsr_map.shape)
        d["tsr_map_no_data"] = NO_DATA
        return d


def tsr_value(tumour_px: int, stroma_px: int, px_mm2: float) -> TSRValue:
    """TSR, clinical score and category from pixel counts (tumour_px + stroma_px > 0)."""
    n = tumour_px + stroma_px
    if n <= 0:
        raise ValueError("TSR needs tumour or stroma pixels")
    return TSRValue(tumour_mm2=tumour_px * px_mm2, stroma_mm2=stroma_px * px_mm2,
                    tsr_pct=100.0 * stroma_px / n, score_pct=-(-10 * stroma_px // n) * 10,
                    category="stroma-high" if 2 * stroma_px > n else "stroma-low")


def tsr_lut() -> np.ndarray:
    """256 x 3 uint8 RGB colours for a TSR map: 0-100 % blue -> yellow (50) -> dark red;
    values 101-254 unused (black); NO_DATA (255) mid grey, to be shown transparent."""
    stops = np.array([0, 30, 50, 70, 100], dtype=float)
    rgb = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67],
                    [165, 0, 38]], dtype=float)
    x = np.arange(101, dtype=float)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:101] = np.rint(np.stack([np.interp(x, stops, rgb[:, i]) for i in range(3)], axis=1))
    lut[NO_DATA] = (128, 128, 128)
    return lut


def field_kernels(radius_px: float, inner_fraction: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Disk of ``radius_px`` and its four sectors N, E, S, W beyond ``inner_fraction * r``.

    Returns ``(disk, sectors)``: bool arrays of shape (k, k) and (4, k, k), k = 2*ceil(r)+1.
    Sectors are 90-degree wedges around the up/right/down/left axes, half-open so that with
    ``inner_fraction = 0`` they partition the disk without its centre pixel; they are exact
    90-degree rotations of each other.
    """
    h = int(math.ceil(radius_px))
    dr, dc = np.mgrid[-h:h + 1, -h:h + 1]
    disk = dr * dr + dc * dc <= radius_px * radius_px

    def east(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # x right, y up
        return (x > 0) & (-x <= y) & (y < x)

    x, y = dc, -dr
    band = disk & (dr * dr + dc * dc >= (inner_fraction * radius_px) ** 2)
    sectors = np.stack([east(y, -x), east(x, y), east(-y, x), east(-x, -y)]) & band
    return disk, sectors


def _correlate(mask: np.ndarray, kernels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For every pixel p: number of mask pixels at p + offset over each kernel's offsets."""
    k = kernels[0].shape[0]
    h = k // 2
    rows, cols = mask.shape
    shape = (sfft.next_fast_len(rows + k - 1, True), sfft.next_fast_len(cols + k - 1, True))
    spectrum = sfft.rfft2(mask.astype(np.float64), s=shape)
    out = []
    for kern in kernels:
        full = sfft.irfft2(spectrum * sfft.rfft2(kern[::-1, ::-1].astype(np.float64), s=shape),
                           s=shape)
        out.append(np.rint(full[h:h + rows, h:h + cols]).astype(np.int32))
    return out


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Pixels within Euclidean distance radius_px of the mask."""
    if radius_px <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask) <= radius_px


def tumour_bulk(tumour: np.ndarray, tissue: np.ndarray, *, closing_px: float,
                margin_px: float) -> np.ndarray:
    """Closing of the tumour mask, holes filled, dilated by the margin, cut to tissue."""
    pad = int(math.ceil(closing_px)) + 1
    grown = _dilate(np.pad(tumour, pad), closing_px)
    closed = ~_dilate(~grown, closing_px) if closing_px > 0 else grown
    closed = ndi.binary_fill_holes(closed[pad:-pad, pad:-pad])
    return (_dilate(closed, margin_px) & tissue) | tumour


def measure_tsr(labels: np.ndarray, *, mpp: float, tumour_values: Sequence[int],
                stroma_values: Sequence[int], background_values: Sequence[int] = (),
                class_names: Sequence[str] | None = None,
                config: TSRConfig = TSRConfig()) -> TSRResult:
    """Whole-tumour, hot-spot and field-distribution TSR of a label map at ``mpp`` um/px.

    The map is reduced (nearest neighbour) to the largest integer factor that does not exceed
    ``config.grid_um``; pass a pyramid level to avoid touching the full-resolution map.
    Missing classes, missing tumour or an empty map give None values with a reason.
    """
    mpp = check_mpp(mpp)
    labels = check_labels(labels)
    tumour_values = [int(v) for v in tumour_values]
    stroma_values = [int(v) for v in stroma_values]
    factor = max(1, int(config.grid_um / mpp + 1e-9))
    small = downsample_labels(labels, factor) if labels.size else labels
    grid_mpp = mpp * factor
    px_mm2 = grid_mpp * grid_mpp / 1e6
    tissue = (small > 0) & ~np.isin(small, list(background_values))
    tumour = np.isin(small, tumour_values)
    stroma = np.isin(small, stroma_values)
    tsr_map = np.full(small.shape, NO_DATA, dtype=np.uint8)

    def result(bulk: np.ndarray, whole: TSRValue | None, whole_reason: str | None,
               hot: Hotspot | None, hot_reason: str | None,
               dist: FieldDistribution) -> TSRResult:
        return TSRResult(
            tumour_classes=tuple(_class_name(v, class_names) for v in tumour_values),
            stroma_classes=tuple(_class_name(v, class_names) for v in stroma_values),
            map_mpp=mpp, grid_mpp=grid_mpp, bulk_mm2=float(bulk.sum()) * px_mm2,
            whole=whole, whole_reason=whole_reason, hotspot=hot, hotspot_reason=hot_reason,
            fields=dist, config=config, tsr_map=tsr_map, bulk=bulk)

    reason = _unmeasurable(labels, tumour_values, stroma_values, tissue=tissue, tumour=tumour)
    if reason is not None:
        return result(np.zeros(small.shape, bool), None, reason, None, reason, _no_fields())

    # Only centres within a field radius of tumour can be eligible, and the bulk stays within
    # closing + margin of it: work in the tumour's bounding box grown by what these reach.
    radius_px = config.field_diameter_um / 2 / grid_mpp
    closing_px, margin_px = config.bulk_closing_um / grid_mpp, config.bulk_margin_um / grid_mpp
    win = _tumour_window(tumour, pad=int(math.ceil(max(2 * radius_px, closing_px + margin_px))) + 2)
    tumour, stroma = tumour[win], stroma[win]
    bulk = np.zeros(small.shape, bool)
    bulk[win] = tumour_bulk(tumour, tissue[win], closing_px=closing_px, margin_px=margin_px)
    whole = tsr_value(int(tumour.sum()), int((stroma & bulk[win]).sum()), px_mm2)

    t, s, eligible = _eligible_fields(tumour, stroma, bulk[win], radius_px=radius_px,
                                      config=config)
    if not eligible.any():
        return result(bulk, whole, None, None, _no_field_reason(config), _no_fields())
    s_e, n_e = s[eligible].astype(np.int64), (t + s)[eligible].astype(np.int64)
    tsr_map[win][eligible] = (200 * s_e + n_e) // (2 * n_e)
    hot = _hotspot(t, s, eligible, origin=(win[0].start, win[1].start), grid_mpp=grid_mpp,
                   mpp=mpp, px_mm2=px_mm2, diameter_um=config.field_diameter_um)
    pct = 100.0 * s_e / n_e
    dist = FieldDistribution(count=int(eligible.sum()), centres_mm2=float(eligible.sum()) * px_mm2,
                             min_pct=float(pct.min()), median_pct=float(np.median(pct)),
                             max_pct=float(pct.max()))
    return result(bulk, whole, None, hot, None, dist)


def _class_name(value: int, class_names: Sequence[str] | None) -> str:
    return (class_names[value - 1] if class_names and 1 <= value <= len(class_names)
            else f"value {value}")


def _no_fields() -> FieldDistribution:
    return FieldDistribution(0, 0.0, None, None, None)


def _unmeasurable(labels: np.ndarray, tumour_values: Sequence[int], stroma_values: Sequence[int],
                  *, tissue: np.ndarray, tumour: np.ndarray) -> str | None:
    """Why no TSR can be measured on this map, or None."""
    if not labels.size:
        return "the label map is empty"
    if not tumour_values:
        return "the model names no tumour class"
    if not stroma_values:
        return "the model names no stroma class"
    if not tissue.any():
        return "the map holds no analysed tissue"
    if not tumour.any():
        return "no tumour in the map"
    return None


def _tumour_window(tumour: np.ndarray, *, pad: int) -> tuple[slice, slice]:
    """The bounding box of the tumour grown by ``pad`` pixels, cut to the map."""
    rows, cols = np.flatnonzero(tumour.any(axis=1)), np.flatnonzero(tumour.any(axis=0))
    r0, c0 = max(0, int(rows[0]) - pad), max(0, int(cols[0]) - pad)
    return slice(r0, rows[-1] + pad + 1), slice(c0, cols[-1] + pad + 1)


def _eligible_fields(tumour: np.ndarray, stroma: np.ndarray, bulk: np.ndarray, *,
                     radius_px: float, config: TSRConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tumour pixels, stroma pixels) in the field centred on each pixel, and whether that
    field is eligible: filled enough, tumour in every sector, centre in the bulk (if asked)."""
    disk, sectors = field_kernels(radius_px, config.sector_inner_radius_fraction)
    t, *sector_t = _correlate(tumour, [disk, *sectors])
    (s,) = _correlate(stroma, [disk])
    n = t + s
    sector_min = max(1, math.ceil(config.min_sector_tumour_fraction * sectors[0].sum() - 1e-9))
    eligible = (n > 0) & (n >= config.min_fill_fraction * disk.sum())
    for st in sector_t:
        eligible &= st >= sector_min
    if config.require_centre_in_bulk:
        eligible &= bulk
    return t, s, eligible


def _no_field_reason(config: TSRConfig) -> str:
    return (f"no {config.field_diameter_um / 1000:g} mm field has tumour on all four "
            f"sides (>= {config.min_sector_tumour_fraction:.0%} of each border sector)"
            f" and >= {config.min_fill_fraction:.0%} tumour + stroma"
            + (" with its centre in the tumour bulk" if config.require_centre_in_bulk else ""))


def _hotspot(t: np.ndarray, s: np.ndarray, eligible: np.ndarray, *, origin: tuple[int, int],
             grid_mpp: float, mpp: float, px_mm2: float, diameter_um: float) -> Hotspot:
    """The eligible field with the highest TSR (of those, the fullest); ``origin`` is the
    grid pixel of the arrays' corner."""
    n = t + s
    ratio = np.where(eligible, s / np.maximum(n, 1), -1.0)
    best = eligible & (ratio == ratio.max())
    r, c = np.unravel_index(int(np.argmax(np.where(best, n, -1))), n.shape)
    v = tsr_value(int(t[r, c]), int(s[r, c]), px_mm2)
    r, c = int(r) + origin[0], int(c) + origin[1]
    row_um, col_um = (r + 0.5) * grid_mpp, (c + 0.5) * grid_mpp
    return Hotspot(**asdict(v), diameter_um=diameter_um, centre_row_um=row_um,
                   centre_col_um=col_um, centre_row_px=row_um / mpp, centre_col_px=col_um / mpp,
                   grid_row=int(r), grid_col=int(c))


def measure_tsr_with_contract(labels: np.ndarray, contract: Any, *, mpp: float,
                              config: TSRConfig = TSRConfig()) -> TSRResult:
    """:func:`measure_tsr` with the roles and names of a ``wsiseg.contract.ModelContract``."""
    background = [contract.background_value] if contract.background_value else []
    return measure_tsr(labels, mpp=mpp, tumour_values=contract.tumour_values,
                       stroma_values=contract.stroma_values, background_values=background,
                       class_names=contract.class_names, config=config)
