"""Whole-slide access: the only module that calls OpenSlide.

OpenSlide speaks (x, y) and (w, h) in level-0 pixels; this module turns its answers into numpy
(row, col) arrays at the *model's* resolution. Coordinates are named by frame: ``l0_`` for
level-0 slide pixels, ``lv_`` for pixels of a pyramid level, ``out_`` for pixels of the output
grid at the target mpp.

Reading at a target mpp: the nearest level at least as fine as the target is chosen; when its
downsample matches the needed one within ``LEVEL_TOLERANCE`` the level is read as is (the
effective mpp is then the level's own). When the needed factor is within the same tolerance of
an integer k (0.25 or 0.5 um/px slides read at 1 um/px), k x k blocks of the level are averaged
(exact, cheap, and again the effective mpp is the level's times k). Otherwise the level is
resampled onto the target grid (Gaussian anti-aliasing, then bilinear sampling at globally
defined positions). Every path gives a tile exactly the pixels of the same area of a
whole-region read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from scipy import ndimage
from skimage.transform import downscale_local_mean

log = logging.getLogger(__name__)

LEVEL_TOLERANCE = 0.03  # relative: a level within 3 % of the wanted downsample is used as is


class SlideError(ValueError):
    """The slide cannot be used; the message says why and what to do."""


class SlideNotFound(SlideError, FileNotFoundError):
    pass


class MppMissing(SlideError):
    pass


@dataclass(frozen=True)
class SlideInfo:
    path: str
    vendor: str
    l0_size: tuple[int, int]  # (w, h) as OpenSlide reports it
    level_sizes: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # level-0 microns per pixel (mean of x and y); nan if unknown
    mpp_source: str
    background_rgb: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"path": self.path, "vendor": self.vendor, "width_px": self.l0_size[0],
                "height_px": self.l0_size[1], "levels": [list(s) for s in self.level_sizes],
                "level_downsamples": list(self.level_downsamples),
                "mpp": None if math.isnan(self.mpp) else self.mpp,
                "mpp_source": self.mpp_source, "background_rgb": list(self.background_rgb)}


@dataclass(frozen=True)
class ReadPlan:
    """How to read the slide on a grid of ``mpp`` microns per pixel."""

    level: int
    scale: float  # level pixels per output pixel (1.0 = read as is)
    mpp: float  # effective microns per output pixel
    out_shape: tuple[int, int]  # (rows, cols) of the whole slide on the output grid

    @property
    def box(self) -> int:
        """k > 1 when the scale is the integer k: each output pixel is the mean of k x k level
        pixels; 1 otherwise."""
        return int(self.scale) if self.scale >= 2 and float(self.scale).is_integer() else 1

    @property
    def resampled(self) -> bool:
        """Interpolated onto a grid that is not an integer subsampling of the level."""
        return self.scale != 1.0 and self.box == 1

    @property
    def method(self) -> str:
        if self.box > 1:
            return f"{self.box}x{self.box} mean"
        return "resampled" if self.resampled else "as is"

    def to_dict(self) -> dict:
        return {"level": self.level, "level_px_per_out_px": self.scale, "mpp": self.mpp,
                "out_shape": list(self.out_shape), "resampled": self.resampled,
                "box": self.box, "method": self.method}


def _mpp_from_properties(props: dict[str, str]) -> tuple[float, str] | None:
    """Microns per pixel from OpenSlide's standard key, then vendor and TIFF keys."""
    pairs = [("openslide.mpp-x", "openslide.mpp-y"),
             ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
              "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y"),
             ("aperio.MPP", "aperio.MPP")]
    for kx, ky in pairs:
        try:
            vx, vy = float(props[kx]), float(props[ky])
        except (KeyError, ValueError):
            continue
        if vx > 0 and vy > 0 and math.isfinite(vx + vy):
            return (vx + vy) / 2, kx
    unit = props.get("tiff.ResolutionUnit", "").lower()
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        rx, ry = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    if per_unit_um and rx > 0 and ry > 0:
        return (per_unit_um / rx + per_unit_um / ry) / 2, "tiff.XResolution"
    return None


def _background(props: dict[str, str]) -> tuple[int, int, int]:
    hexcolor = props.get("openslide.background-color", "FFFFFF")
    try:
        v = int(hexcolor, 16)
    except ValueError:
        v = 0xFFFFFF
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


class Slide:
    """An open slide (context manager). Reads are thread-safe (OpenSlide's handle is)."""

    def __init__(self, path: str | Path, *, mpp: float | None = None,
                 require_mpp: bool = True) -> None:
        path = Path(path)
        if not path.exists():
            raise SlideNotFound(f"slide not found: {path}")
        if path.is_dir():
            raise SlideError(f"{path} is a folder; give the slide file inside it")
        if path.suffix.lower() == ".mrxs" and not path.with_suffix("").is_dir():
            raise SlideError(f"MRXS slide {path.name} needs its data folder "
                             f"'{path.with_suffix('').name}/' beside it (copy the folder too)")
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{path} is not a slide format OpenSlide reads "
                             "(.svs, .mrxs, .ndpi, .scn, .bif, tiled TIFF, ...)") from None
        except openslide.OpenSlideError as e:
            raise SlideError(f"{path} could not be opened (corrupt or truncated?): {e}") from None
        props = dict(self._osr.properties)
        if mpp is not None:
            if not (mpp > 0 and math.isfinite(mpp)):
                self._osr.close()
                raise SlideError("the pixel size given must be a positive number of microns, "
                                 f"got {mpp}")
            found: tuple[float, str] | None = (float(mpp), "override")
        else:
            found = _mpp_from_properties(props)
        self._mpp_message = (f"{path.name} does not record its pixel size; pass it with --mpp "
                             "(microns per pixel at level 0, e.g. --mpp 0.25 for 40x, 0.5 for 20x)")
        if found is None and require_mpp:
            self._osr.close()
            raise MppMissing(self._mpp_message)
        self.info = SlideInfo(
            path=str(path), vendor=props.get("openslide.vendor", "generic"),
            l0_size=tuple(self._osr.dimensions),  # type: ignore[arg-type]
            level_sizes=tuple(tuple(d) for d in self._osr.level_dimensions),  # type: ignore[misc]
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=found[0] if found else math.nan, mpp_source=found[1] if found else "missing",
            background_rgb=_background(props))

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning ------------------------------------------------------------------------------
    def plan(self, mpp: float, *, tolerance: float = LEVEL_TOLERANCE) -> ReadPlan:
        """Choose the level and resampling that give a grid of ``mpp`` microns per pixel.

        A level (or an integer block mean of it) within ``tolerance`` of the wanted downsample
        is used as is; a tolerance of about zero asks for a grid at ``mpp`` itself, resampled
        unless a level or block mean lands on it."""
        if math.isnan(self.info.mpp):
            raise MppMissing(self._mpp_message)
        want = mpp / self.info.mpp  # level-0 pixels per output pixel
        level = 0
        for k, ds in enumerate(self.info.level_downsamples):
            if ds <= want * (1 + tolerance):
                level = k if ds > self.info.level_downsamples[level] else level
        ds = self.info.level_downsamples[level]
        lw, lh = self.info.level_sizes[level]
        if abs(ds / want - 1) <= tolerance:
            return ReadPlan(level=level, scale=1.0, mpp=self.info.mpp * ds, out_shape=(lh, lw))
        scale = want / ds
        k = round(scale)
        if k >= 2 and abs(scale / k - 1) <= tolerance:
            return ReadPlan(level=level, scale=float(k), mpp=self.info.mpp * ds * k,
                            out_shape=(max(1, lh // k), max(1, lw // k)))
        w0, h0 = self.info.l0_size
        return ReadPlan(level=level, scale=scale, mpp=mpp,
                        out_shape=(max(1, round(h0 / want)), max(1, round(w0 / want))))

    # -- reading -------------------------------------------------------------------------------
    def _read_level(self, level: int, lv_row: int, lv_col: int, h: int, w: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """RGB composited on the background colour, and a mask of scanned (alpha > 0) pixels."""
        ds = self.info.level_downsamples[level]
        l0_x, l0_y = round(lv_col * ds), round(lv_row * ds)
        try:
            rgba = np.asarray(self._osr.read_region((l0_x, l0_y), level, (w, h)))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{Path(self.info.path).name}: reading failed near level-0 "
                             f"(x={l0_x}, y={l0_y}) (corrupt or truncated file?): {e}") from None
        if rgba[..., 3].min() == 255:  # fully scanned (the usual case): nothing to composite
            return np.ascontiguousarray(rgba[..., :3]), np.ones(rgba.shape[:2], bool)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        bg = np.asarray(self.info.background_rgb, np.float32)
        rgb = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8), rgba[..., 3] > 0

    def read(self, plan: ReadPlan, out_row: int, out_col: int, h: int, w: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """Read an (h, w) window of the output grid; areas outside the slide come back as
        background with ``scanned`` False. Returns (rgb uint8 (h, w, 3), scanned bool (h, w))."""
        if plan.box > 1:
            k = plan.box
            rgb, scanned = self._read_level(plan.level, out_row * k, out_col * k, h * k, w * k)
            return block_mean(rgb, k), _block_majority(scanned, k)
        if not plan.resampled:
            return self._read_level(plan.level, out_row, out_col, h, w)
        s = plan.scale
        sigma = max(0.0, (s - 1.0) / 2.0)
        margin = int(math.ceil(4 * sigma)) + 2
        # Output pixel centre (r + 0.5) maps to level position (r + 0.5) * s - 0.5.
        lv_r0 = int(math.floor((out_row + 0.5) * s - 0.5)) - margin
        lv_c0 = int(math.floor((out_col + 0.5) * s - 0.5)) - margin
        lv_h = int(math.ceil(h * s)) + 2 * margin + 1
        lv_w = int(math.ceil(w * s)) + 2 * margin + 1
        rgb, scanned = self._read_level(plan.level, lv_r0, lv_c0, lv_h, lv_w)
        if sigma > 0:
            src = ndimage.gaussian_filter(rgb, sigma=(sigma, sigma, 0), truncate=4.0,
                                          output=np.float32)
        else:
            src = rgb.astype(np.float32)
        rows = (np.arange(out_row, out_row + h) + 0.5) * s - 0.5 - lv_r0
        cols = (np.arange(out_col, out_col + w) + 0.5) * s - 0.5 - lv_c0
        # Bilinear sampling, done separably (rows, then columns): same result as a 2-D
        # interpolation at these positions, several times faster.
        r0 = np.floor(rows).astype(np.intp)
        c0 = np.floor(cols).astype(np.intp)
        fr = (rows - r0).astype(np.float32)[:, None, None]
        fc = (cols - c0).astype(np.float32)[None, :, None]
        tmp = src[r0] * (1 - fr) + src[r0 + 1] * fr
        out = tmp[:, c0] * (1 - fc) + tmp[:, c0 + 1] * fc
        # A pixel counts as scanned if its nearest source pixel was.
        ok = scanned[np.rint(rows).astype(np.intp)][:, np.rint(cols).astype(np.intp)]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), ok

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Whole slide at about ``mpp`` (coarse), as (rgb, scanned, effective mpp).

        Read in strips from the best level, so memory stays small even for a slide that has
        a single, huge level."""
        want = mpp / self.info.mpp
        level = self._osr.get_best_level_for_downsample(want)
        ds = self.info.level_downsamples[level]
        lw, lh = self.info.level_sizes[level]
        step = max(1, int(round(want / ds)))
        strip = step * max(1, 2048 // step)
        rgbs, masks = [], []
        for lv_row in range(0, lh, strip):
            h = min(strip, lh - lv_row)
            rgb, scanned = self._read_level(level, lv_row, 0, h, lw)
            if step > 1:
                rgb = downscale_local_mean(rgb, (step, step, 1)).round().astype(np.uint8)
                scanned = downscale_local_mean(scanned.astype(np.float32), (step, step)) > 0.5
            rgbs.append(rgb)
            masks.append(scanned)
        return np.concatenate(rgbs), np.concatenate(masks), self.info.mpp * ds * step


def _block_sum(a: np.ndarray, k: int, dtype: type) -> np.ndarray:
    """Sum of k x k blocks, as k * k strided adds (several times faster than reshape + sum)."""
    total = a[0::k, 0::k].astype(dtype)
    for i in range(k):
        for j in range(k):
            if i or j:
                total += a[i::k, j::k]
    return total


def block_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    """Rounded mean of k x k blocks of a uint8 image whose sides are multiples of k."""
    total = _block_sum(rgb, k, np.uint16 if k <= 16 else np.uint32)
    return ((total + (k * k) // 2) // (k * k)).astype(np.uint8)


def _block_majority(mask: np.ndarray, k: int) -> np.ndarray:
    """True where more than half of a k x k block is True."""
    h, w = mask.shape[0] // k, mask.shape[1] // k
    if mask.all():
        return np.ones((h, w), bool)
    return _block_sum(mask, k, np.uint32) * 2 > k * k


def versions() -> dict[str, str]:
    return {"openslide-python": openslide.__version__, "openslide": openslide.__library_version__}
