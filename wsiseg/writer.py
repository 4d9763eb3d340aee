"""Write class maps as pyramidal tiled TIFFs that OpenSlide, libvips, QuPath and ASAP open.

Why the file looks the way it does:

- Every level is a tiled *top-level* page, those after the first with ``SubfileType = 1``:
  OpenSlide's generic-TIFF reader walks top-level IFDs only and ignores SubIFD pyramids.
- Levels halve by nearest neighbour (``level[::2, ::2]``) so that class values never mix.
- Resolution tags in pixels per centimetre (1e4 / mpp of the level): OpenSlide derives
  ``openslide.mpp-x/y`` from them.
- With a colormap, pages are palette images, so viewers show classes in colour; the legend
  and provenance travel as JSON in the ImageDescription of page 0.
- The file is written under a temporary name in the output folder and renamed into place:
  a failed or interrupted run never leaves a half-written file at the final path.

Memory stays flat for maps far larger than RAM: the input is read one strip of tile rows at a
time, and each reduced level is built from the strips of the level above while that level is
written, into an anonymous temporary file next to the output (about 1/3 of the raw map size).
This is the only module that writes TIFF with tifffile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsiseg import __version__
from wsiseg.files import atomic_path
from wsiseg.labels import add_counts

log = logging.getLogger(__name__)

COMPRESSIONS = ("zlib", None)  # what every target reader decodes without extra codecs
_BUFFER_BYTES = 8 << 20  # tiles tifffile may hold ahead of the encoder (its default: 512 MiB)
# zlib level 3 writes label maps about 3x faster than the default 6, for files about 1.5x larger
# (measured on synthetic 8k x 8k labels: 94 vs 34 Mpx/s).
_ZLIB_LEVEL = 3
_BIGTIFF_BYTES = (1 << 32) - (64 << 20)  # switch to BigTIFF when raw data nears 4 GiB


def write_pyramid(path: str | os.PathLike, image: Any, *, mpp: float,
                  colormap: Sequence[Sequence[int]] | None = None,
                  description: dict[str, Any] | None = None, tile_px: int = 512,
                  compression: str | None = "zlib",
                  min_size_px: int | None = None) -> list[tuple[int, int]]:
    """Write a 2-D uint8 label map as a pyramidal tiled TIFF; return the (h, w) of each level.

    ``image`` is anything 2-D with ``shape`` whose row slices ``image[r0:r1]`` give uint8
    arrays: a numpy array, or one larger than RAM in a file (an ``np.memmap``, the pipeline's
    ``wsiseg.canvas.DiskCanvas``). ``mpp`` is microns per pixel of level 0. ``colormap`` lists
    RGB triplets (0-255) for values 0, 1, ...; it makes the pages palette images.
    ``description`` is stored as JSON (read it back with :func:`read_description`). Levels halve
    until the longer side is at most ``min_size_px`` (default ``tile_px``, i.e. the last level
    fits in one tile).
    """
    h, w = _check_2d(image, "image")
    _check_options(mpp, tile_px, compression)
    min_size_px = tile_px if min_size_px is None else min_size_px
    if min_size_px < 1:
        raise ValueError(f"min_size_px must be >= 1, got {min_size_px}")
    shapes = [(h, w)]
    while max(shapes[-1]) > min_size_px:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    extra: dict[str, Any] = {}
    if colormap is not None:
        extra = {"photometric": "palette", "colormap": _palette(colormap)}
    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        bigtiff = sum(a * b for a, b in shapes) >= _BIGTIFF_BYTES
        tw = stack.enter_context(tifffile.TiffWriter(tmp, bigtiff=bigtiff))
        source = image
        for level, shape in enumerate(shapes):
            put, reduced = (_reduced_level(shapes[level + 1], tmp.parent, stack)
                            if level + 1 < len(shapes) else (None, None))
            tw.write(_tiles(source, shape, tile_px, put), shape=shape, dtype=np.uint8,
                     tile=(tile_px, tile_px), subfiletype=1 if level else 0,
                     **_page_tags(mpp * 2**level, compression, description if level == 0 else None),
                     **extra)
            source = reduced() if reduced else None
    return shapes


def write_stack(path: str | os.PathLike, stack: Any, *, mpp: float,
                names: Sequence[str] | None = None, description: dict[str, Any] | None = None,
                tile_px: int = 512, compression: str | None = "zlib") -> None:
    """Write a [C, H, W] uint8 stack (e.g. per-class probabilities x 255) as a tiled TIFF.

    One full-resolution page per channel, in channel order, each with the resolution tags and
    its name in the PageName tag; no pyramid (these are analysis outputs, not for viewing).
    ``names`` and ``description`` go into the JSON of page 0 as ``{"channels": names, ...}``.
    Read it back with :func:`read_stack`. Memory stays flat as in :func:`write_pyramid`.
    """
    shape = getattr(stack, "shape", ())
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"stack must be a non-empty [C, H, W] array, got shape {tuple(shape)}")
    _check_2d(stack[0], "stack[0]")
    _check_options(mpp, tile_px, compression)
    names = [f"channel {c}" for c in range(shape[0])] if names is None else list(names)
    if len(names) != shape[0]:
        raise ValueError(f"{len(names)} names given for {shape[0]} channels")
    meta = {"channels": names, **(description or {})}
    with atomic_path(path) as tmp, tifffile.TiffWriter(
            tmp, bigtiff=math.prod(shape) >= _BIGTIFF_BYTES) as tw:
        for c, name in enumerate(names):
            tw.write(_tiles(stack[c], shape[1:], tile_px, None), shape=shape[1:],
                     dtype=np.uint8, tile=(tile_px, tile_px),
                     extratags=[(285, "s", 0, name.encode("ascii", "replace").decode(), True)],
                     **_page_tags(mpp, compression, meta if c == 0 else None))


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON dict stored in page 0 by the writers ({} when the file has no description)."""
    with tifffile.TiffFile(path) as tif:
        text = tif.pages[0].description
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None  # reported below, with the hint
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the image description is not a JSON object; "
                         "was the file written by wsiseg?")
    return value


def read_level(path: str | os.PathLike, *, level: int = 0) -> np.ndarray:
    """One pyramid level (page) as an array, fully in memory: for small maps and tests."""
    with tifffile.TiffFile(path) as tif:
        if not 0 <= level < len(tif.pages):
            raise ValueError(f"{path} has {len(tif.pages)} levels; level {level} does not exist")
        return tif.pages[level].asarray()


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """All pages of a :func:`write_stack` file as one [C, H, W] array, fully in memory."""
    with tifffile.TiffFile(path) as tif:
        return np.stack([page.asarray() for page in tif.pages])


def _check_2d(image: Any, what: str) -> tuple[int, int]:
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {shape}")
    dtype = getattr(image, "dtype", np.uint8)
    if dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {dtype}")
    return shape  # type: ignore[return-value]


def _check_options(mpp: float, tile_px: int, compression: str | None) -> None:
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16 (TIFF), got {tile_px}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _palette(colormap: Sequence[Sequence[int]]) -> np.ndarray:
    """3 x 256 uint16 TIFF colormap (8-bit colours scaled by 257 so 255 maps to 65535)."""
    rgb = np.asarray(colormap, dtype=np.int64)
    if rgb.ndim != 2 or rgb.shape[1] != 3 or not 1 <= len(rgb) <= 256:
        raise ValueError(f"colormap must be 1-256 RGB triplets, got shape {rgb.shape}")
    if rgb.min() < 0 or rgb.max() > 255:
        raise ValueError("colormap values must be 0-255")
    table = np.zeros((3, 256), np.uint16)
    table[:, :len(rgb)] = rgb.T * 257
    return table


def _page_tags(mpp: float, compression: str | None,
               description: dict[str, Any] | None) -> dict[str, Any]:
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER",
            "compression": compression, "metadata": None, "software": f"wsiseg {__version__}",
            "compressionargs": {"level": _ZLIB_LEVEL} if compression == "zlib" else None,
            "description": None if description is None else json.dumps(description),
            "buffersize": _BUFFER_BYTES}


def _tiles(source: Any, shape: tuple[int, int], tile_px: int,
           put_reduced: Callable[[np.ndarray], None] | None) -> Iterator[np.ndarray]:
    """Yield the tiles of ``source`` in TIFF order, reading one strip of tile rows at a time.

    Each strip is also handed, halved, to ``put_reduced`` to build the next level.
    """
    h, w = shape
    release = _page_releaser(source)
    for r0 in range(0, h, tile_px):
        strip = np.array(source[r0:r0 + tile_px])  # a copy, detached from any file mapping
        release()
        if strip.dtype != np.uint8 or strip.shape != (min(tile_px, h - r0), w):
            raise ValueError(f"rows {r0}: expected uint8 of shape {(min(tile_px, h - r0), w)}, "
                             f"got {strip.dtype} of shape {strip.shape}")
        if put_reduced is not None:  # before the tiles: tifffile stops pulling after the last
            put_reduced(strip[::2, ::2])
        for c0 in range(0, w, tile_px):
            yield strip[:, c0:c0 + tile_px]


def _page_releaser(array: Any) -> Callable[[], None]:
    """Return a function that unmaps the pages of a read-shared ``np.memmap`` from this process.

    Pages of a file mapping that were read stay resident and count as this process's RSS (and
    against batch-scheduler memory limits) until the kernel needs them; dropping them after
    each strip keeps RSS flat. Their data stays in the page cache. Copy-on-write (mode 'c')
    mappings are left alone: dropping them would discard the caller's private changes.
    """
    mode, base = None, array
    while base is not None and not isinstance(base, mmap.mmap):
        mode = mode or (base.mode if isinstance(base, np.memmap) else None)
        base = getattr(base, "base", None)
    if base is None or mode not in ("r", "r+", "w+") or not hasattr(mmap, "MADV_DONTNEED"):
        return lambda: None
    return lambda: base.madvise(mmap.MADV_DONTNEED)


def _reduced_level(shape: tuple[int, int], folder: Path, stack: contextlib.ExitStack
                   ) -> tuple[Callable[[np.ndarray], None], Callable[[], np.memmap]]:
    """Collect the rows of the next level, in order: (append rows, finish -> array).

    The rows go to an anonymous temporary file in the output folder (deleted by the OS even if
    the process is killed), not to RAM: a reduced level of a large map is itself large.
    """
    file = stack.enter_context(tempfile.TemporaryFile(dir=folder))

    def finish() -> np.memmap:
        file.flush()
        return np.memmap(file, dtype=np.uint8, mode="r", shape=shape)
    return (lambda rows: file.write(np.ascontiguousarray(rows).data)), finish


def level_shapes(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(h, w) of every page of a map, level 0 first."""
    with tifffile.TiffFile(path) as tif:
        return [tuple(p.shape[:2]) for p in tif.pages]  # type: ignore[misc]


def count_level_values(path: str | os.PathLike, *, n_values: int, level: int = 0) -> np.ndarray:
    """Pixel count of every value 0..n_values-1 on one level of a map file, decoding one tile at
    a time (so a whole-slide map never has to fit in memory). Tiles are cropped to the image:
    the padding of edge tiles is not counted."""
    counts = np.zeros(n_values, np.int64)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        h, w = page.shape[:2]
        for data, index, _ in page.segments(maxworkers=1):
            if data is None:
                continue
            r0, c0 = index[-3], index[-2]  # (..., row, col, sample) of the tile's corner
            tile = data.reshape(data.shape[-3], data.shape[-2], -1)[..., 0]
            tile = tile[: max(0, h - r0), : max(0, w - c0)]
            add_counts(counts, tile)
    return counts


def version() -> str:
    return tifffile.__version__


def write_rgb_pyramid(path: str | os.PathLike, rgb: np.ndarray, *, mpp: float,
                      software: str = "wsiseg", tile_px: int = 256) -> None:
    """Write an RGB uint8 image as a tiled pyramidal TIFF slide that OpenSlide opens as a
    generic TIFF: zlib (level 9, horizontal predictor), levels as top-level pages halved by
    2 x 2 block means (as wsiseg reads them) until the longer side is under 512 px, pixel size
    in the resolution tags. Used for demo and evaluation slides made from crops."""
    from .slide import block_mean  # pure numpy; the slide module owns the block mean

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be [H, W, 3] uint8, got {rgb.shape} {rgb.dtype}")
    _check_options(mpp, tile_px, "zlib")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        level, k = rgb, 0
        while True:
            px_per_cm = 1e4 / (mpp * 2 ** k)
            tw.write(level, photometric="rgb", tile=(tile_px, tile_px), compression="zlib",
                     predictor=True, compressionargs={"level": 9}, subfiletype=1 if k else 0,
                     metadata=None, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", software=software)
            if max(level.shape[:2]) < 512:
                break
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level, k = block_mean(level[:h, :w], 2), k + 1
