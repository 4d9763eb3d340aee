"""Synthetic slides and label maps with known answers, for tests.

``make_slide`` writes a tiled pyramidal RGB TIFF that OpenSlide opens as a ``generic-tiff``
slide with several levels. What OpenSlide 4.0 reports for such a file (checked in
tests/test_writer.py):

- with resolution tags (ResolutionUnit = centimeter, XResolution = 1e4 / mpp pixels per cm)
  it derives ``openslide.mpp-x`` / ``openslide.mpp-y`` = mpp itself, and also exposes the raw
  tags as ``tiff.XResolution``, ``tiff.YResolution`` and ``tiff.ResolutionUnit``
  (``"centimeter"`` or ``"inch"``);
- without them (tifffile then writes XResolution = YResolution = 1 with ResolutionUnit = none)
  there is no ``openslide.mpp-x``; ``tiff.XResolution`` is ``"1"`` and ``tiff.ResolutionUnit``
  is ``"none"``, which carries no physical size, so a reader must ask for an explicit mpp.

A slide reader can fall back to the ``tiff.*`` properties where ``openslide.mpp-x`` is absent:
mpp = 1e4 / XResolution for centimeter, 25400 / XResolution for inch, nothing for none.
"""

from __future__ import annotations

import os

import numpy as np
import tifffile

BACKGROUND_RGB = (255, 255, 255)
# Flat, clearly separated H&E-like colours: eosin-pink (stroma-like), haematoxylin-purple
# (tumour-like). Blob label k + 1 has colour BLOB_RGB[k].
PINK_RGB = (235, 140, 190)
PURPLE_RGB = (110, 60, 160)
BLOB_RGB = (PINK_RGB, PURPLE_RGB)


def make_slide(path: str | os.PathLike, rgb: np.ndarray, *, mpp: float | None,
               levels: int = 3, tile_px: int = 256) -> list[tuple[int, int]]:
    """Write ``rgb`` (H, W, 3 uint8) as a tiled pyramidal TIFF slide; return level (h, w).

    Levels are top-level pages, the reduced ones with SubfileType = 1, each halved by a 2 x 2
    mean (edge pixels repeated for odd sizes). zlib compression, since JPEG needs imagecodecs.
    Resolution tags are written only when ``mpp`` is given.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    shapes = []
    with tifffile.TiffWriter(path) as tw:
        level = rgb
        for k in range(levels):
            resolution = {} if mpp is None else {
                "resolution": (1e4 / (mpp * 2**k),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(level, photometric="rgb", tile=(tile_px, tile_px), compression="zlib",
                     subfiletype=1 if k else 0, metadata=None, **resolution)
            shapes.append(level.shape[:2])
            level = halve_rgb(level)
    return shapes


def halve_rgb(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 mean of an (H, W, 3) image; odd sizes round up by repeating the last row/column."""
    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    summed = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((summed + 2) // 4).astype(np.uint8)


def make_tissue_rgb(h: int, w: int, rng: np.random.Generator, *, n_blobs: int = 4,
                    noise: float = 3.0, margin_px: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """White image with elliptical blobs of the colours in ``BLOB_RGB``; return (rgb, labels).

    ``labels`` (uint8) is 0 on background and k + 1 where blob colour k was painted, so a
    colour-rule model has an exact answer. Blob kinds alternate so every colour occurs when
    ``n_blobs >= 2``. Gaussian noise of ``noise`` grey levels keeps the image from being flat
    without moving any pixel across the pink/purple/white boundaries.
    """
    labels = np.zeros((h, w), np.uint8)
    rows, cols = np.ogrid[:h, :w]
    for i in range(n_blobs):
        ry = rng.uniform(0.08, 0.2) * h
        rx = rng.uniform(0.08, 0.2) * w
        cy = rng.uniform(ry + margin_px, max(ry + margin_px + 1, h - ry - margin_px))
        cx = rng.uniform(rx + margin_px, max(rx + margin_px + 1, w - rx - margin_px))
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        labels[inside] = i % len(BLOB_RGB) + 1
    palette = np.array((BACKGROUND_RGB, *BLOB_RGB), np.float64)
    rgb = palette[labels] + rng.normal(0.0, noise, (h, w, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels


def make_labels(h: int, w: int, rng: np.random.Generator, *, n_classes: int,
                block_px: int = 16) -> np.ndarray:
    """Blocky random label map (values 0..n_classes) like a coarse segmentation, uint8."""
    coarse = rng.integers(0, n_classes + 1, (-(-h // block_px), -(-w // block_px)),
                          dtype=np.uint8)
    return np.repeat(np.repeat(coarse, block_px, axis=0), block_px, axis=1)[:h, :w].copy()
