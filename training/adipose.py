"""Adipose-tissue patches drawn in the training crop's own stain.

Fat is everywhere in colorectal resections (submucosa, subserosa, around lymph nodes) and absent
from biopsy crop sets such as EBHI-Seg: a model that has never seen it calls its membranes and
the odd nucleus squeezed between adipocytes tumour or stroma, which biases areas and the
tumour-stroma ratio. Fat is neither, so these patches teach it as the background class.

- :func:`adipose` draws a sheet of adipocytes: cells 40-120 um across (a jittered grid of seeds,
  each pixel belonging to its nearest seed after a smooth random warp, so that the cells are
  irregular polygons with curved sides), a thin translucent membrane (0.8-5 um) along every
  cell border, torn in places as sectioning tears it, a few flattened nuclei lying in the
  membranes, and lumens of the slide's glass colour.
- :func:`paste_adipose` puts such a sheet into a training patch inside an irregular blob (or
  over all of it: :func:`training.aggregates.paste_sheet`) and labels the blob with the given
  class; the membrane and nucleus colours are taken from the patch's own tissue, so the stain is
  the crop's, and colour augmentation comes after as for any patch.

Sizes are in micrometres and converted with the training mpp.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import filters

from .aggregates import paste_sheet

CELL_UM = (40.0, 120.0)        # adipocyte diameter
MEMBRANE_UM = (0.8, 5.0)       # membrane thickness (thin, or folded and seen broad)
OPACITY = (0.45, 1.0)          # thin membranes are translucent, pale lavender-pink
NUCLEUS_UM = ((6.0, 11.0), (1.5, 3.0))   # flattened nucleus: length, width
TEAR = (0.0, 0.3)              # share of membrane length torn away
GLASS = (228.0, 250.0)         # lumen brightness when the patch shows no glass of its own
FALLBACK_TISSUE = np.array([205.0, 150.0, 195.0])   # pink-purple H&E, used on all-white patches
FALLBACK_NUCLEUS = np.array([95.0, 60.0, 135.0])


def stain_colours(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Membrane, nucleus and lumen RGB taken from ``image``'s tissue and glass."""
    px = image.reshape(-1, 3).astype(float)
    grey = px.mean(1)
    tissue = px[grey < 200]
    if len(tissue) >= 200:
        g = tissue.mean(1)
        membrane = np.median(tissue[g >= np.percentile(g, 60)], 0)   # eosin rather than nuclei
        nucleus = np.median(tissue[g <= np.percentile(g, 5)], 0)
    else:
        membrane, nucleus = FALLBACK_TISSUE, FALLBACK_NUCLEUS
    # the slide's glass: light pixels, not the pure white a scanner writes beyond the tissue
    glass = px[(grey >= 215) & (px.max(1) - px.min(1) < 30) & (px.min(1) < 255)]
    lumen = (np.median(glass, 0) if len(glass) >= 200
             else np.full(3, rng.uniform(*GLASS)) + rng.normal(0, 2, 3))
    # membranes are thin, so they look a little darker and more saturated than bulk stroma
    membrane = membrane * rng.uniform(0.8, 1.0)
    return membrane, nucleus, lumen


def cells(size: int, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` int label image of irregular adipocytes (each label one cell)."""
    spacing = rng.uniform(*CELL_UM) / mpp
    margin = spacing
    grid = np.arange(-margin, size + margin, spacing)
    sy, sx = np.meshgrid(grid, grid, indexing="ij")
    seeds = np.stack([sy.ravel(), sx.ravel()], 1) + rng.normal(0, spacing * 0.3, (sy.size, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    warp = spacing * 0.12
    dy = filters.gaussian(rng.normal(0, 1, (size, size)), spacing / 3)
    dx = filters.gaussian(rng.normal(0, 1, (size, size)), spacing / 3)
    dy *= warp / max(dy.std(), 1e-9)
    dx *= warp / max(dx.std(), 1e-9)
    _, nearest = cKDTree(seeds).query(np.stack([(yy + dy).ravel(), (xx + dx).ravel()], 1))
    return nearest.reshape(size, size).astype(np.int32)


def adipose(size: int, mpp: float, image: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` RGB uint8 sheet of fat in ``image``'s colours, and its membranes and
    nuclei (bool, the pixels that are not lumen)."""
    membrane_rgb, nucleus_rgb, lumen_rgb = stain_colours(image, rng)
    lab = cells(size, mpp, rng)
    border = np.zeros((size, size), bool)
    border[:-1] |= lab[:-1] != lab[1:]
    border[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    half = rng.uniform(*MEMBRANE_UM) / mpp / 2
    dist = ndi.distance_transform_edt(~border)
    line = np.clip(half + 0.5 - dist, 0.0, 1.0)           # antialiased line of that thickness
    tear = filters.gaussian(rng.normal(0, 1, (size, size)), 4.0 / mpp)
    line[tear < np.quantile(tear, rng.uniform(*TEAR))] = 0.0
    alpha = line * rng.uniform(*OPACITY)
    canvas = np.broadcast_to(lumen_rgb, (size, size, 3)) + rng.normal(0, 2.0, (size, size, 3))
    canvas = canvas * (1 - alpha[..., None]) + membrane_rgb * alpha[..., None]
    # flattened nuclei lying in the membranes, one per 400 um of membrane (one adipocyte in
    # three or so shows its nucleus in a section)
    on = np.argwhere(border & (line > 0.5))
    n_nuclei = int(rng.poisson(len(on) * mpp / 400.0)) if len(on) else 0
    for r, c in on[rng.integers(0, len(on), n_nuclei)] if n_nuclei else ():
        length = rng.uniform(*NUCLEUS_UM[0]) / mpp / 2
        width = rng.uniform(*NUCLEUS_UM[1]) / mpp / 2
        r0, r1 = max(int(r - length - 2), 0), min(int(r + length + 3), size)
        c0, c1 = max(int(c - length - 2), 0), min(int(c + length + 3), size)
        # the nucleus lies along the membrane: its long axis is the nearby border's main axis
        near = np.argwhere(border[r0:r1, c0:c1]).astype(float)
        t = 0.0
        if len(near) >= 3:
            _, axes = np.linalg.eigh(np.cov(near.T))
            t = float(np.arctan2(axes[0, 1], axes[1, 1]))   # (row, col) of the largest axis
        y, x = np.mgrid[r0 - r:r1 - r, c0 - c:c1 - c].astype(float)
        u = x * np.cos(t) + y * np.sin(t)
        v = -x * np.sin(t) + y * np.cos(t)
        a = np.clip(3.0 * (1 - np.hypot(u / length, v / width)), 0.0, 1.0)[..., None]
        canvas[r0:r1, c0:c1] = canvas[r0:r1, c0:c1] * (1 - a) + nucleus_rgb * a
        alpha[r0:r1, c0:c1] = np.maximum(alpha[r0:r1, c0:c1], a[..., 0])
    canvas = filters.gaussian(canvas, 0.4 / mpp, channel_axis=-1, preserve_range=True)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), alpha > 0.2


def paste_adipose(image: np.ndarray, labels: np.ndarray, value: int, mpp: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image``/``labels`` with fat inside a blob, labelled ``value``; the rest stays."""
    size = labels.shape[0]
    if labels.shape[1] != size:
        raise ValueError("adipose patches must be square")
    sheet, _ = adipose(size, mpp, image, rng)
    return paste_sheet(image, labels, sheet, value, rng)
