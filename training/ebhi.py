"""Tissue labels from EBHI-Seg gland masks, derived as an annotator of sparse labels would.

EBHI-Seg (Shi et al., Front. Med. 2023, doi:10.3389/fmed.2023.1114673) gives each 224x224
biopsy crop a binary mask: white = gland epithelium, black = everything else. The paper this
project follows (Bokhorst et al. 2019) needs tissue classes, with 0 = unannotated. The
derivation (:func:`derive_labels`) turns a mask plus the image's class into:

- **epithelium** (mask >= threshold, at least ``border_um`` inside the gland edge): tumour in
  ``Adenocarcinoma`` images, healthy glands in ``Normal`` images;
- **stroma** (tissue at least ``border_um`` outside every gland, not in a gland lumen):
  desmoplastic stroma in ``Adenocarcinoma`` images, lamina propria stroma in ``Normal`` images;
- **background**: near-white pixels (bright and unsaturated after a small median filter) away
  from glands and outside lumina, in regions of at least ``min_background_um2``;
- **0, unannotated**: a ring of ``border_um`` on both sides of every gland edge (where an
  annotator would not commit and where the masks are least exact), gland lumina (holes of the
  gland mask: mucus, debris or empty), a ring of ``white_border_um`` around background, pixels
  neither clearly tissue nor clearly white, and small white specks inside tissue.

Distances are in micrometres and assume ``mpp`` (default 1.0 µm/px, which EBHI-Seg does not
publish; crypt size suggests it is close to 1).

Two kinds of annotation are simulated from these labels:

- **dense** (:func:`derive_labels` as is): every pixel an annotator could name is named;
- **sparse** (:func:`sparsify`): only the eroded interiors of a random subset of the connected
  regions of each class, each cut to a blob of at most ``blob_um`` radius around a random
  interior point, the rest 0 — like the strokes and outlines of a sparse annotator, who never
  annotates borders between classes.

``mapping = "ebhi"`` in a ``[[data.sets]]`` of kind ``pairs`` uses this derivation (see
:func:`mapping_for_set`): ``foreground_column`` + ``foreground_map`` name the epithelium class
per image class, ``values`` names the stroma class per image class, ``background`` the class of
near-white pixels, ``threshold`` the mask threshold and ``annotation`` whether training rows
are sparsified. Validation rows (``split_column`` value ``val``) are always dense: they are the
reference the models are scored on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class Derivation:
    """Parameters of the label derivation (distances in µm, converted with ``mpp``)."""

    mpp: float = 1.0                  # assumed µm per pixel of the crops
    threshold: int = 128              # mask >= threshold is epithelium (edges are anti-aliased)
    border_um: float = 3.0            # unannotated ring on each side of a gland edge
    white_min: int = 205              # near-white: every RGB channel >= this ...
    white_max_sat: float = 0.12       # ... and saturation (max-min)/max below this
    tissue_max: int = 190             # clearly tissue: some channel below this, or saturated
    tissue_min_sat: float = 0.18
    white_border_um: float = 2.0      # unannotated ring around background
    min_background_um2: float = 150.0  # smaller white specks inside tissue stay unannotated


@dataclass(frozen=True)
class Sparsity:
    """Parameters of the sparse-annotation simulation."""

    keep_fraction: float = 0.5        # fraction of the regions of each class that are annotated
    erode_um: float = 6.0             # interiors only: regions are eroded by this much
    blob_um: float = 40.0             # a kept region is cut to a disk of this radius ...
    min_region_um2: float = 30.0      # ... and regions smaller than this after erosion are dropped


def _um_to_px(um: float, mpp: float) -> float:
    return um / mpp


def derive_labels(image: np.ndarray, mask: np.ndarray, *, epithelium: int, stroma: int,
                  background: int, params: Derivation = Derivation()) -> np.ndarray:
    """Dense label map (uint8, 0 = unannotated) of one EBHI-Seg crop; see the module docstring.

    ``epithelium``, ``stroma`` and ``background`` are label values (0 leaves that kind of pixel
    unannotated).
    """
    gray = mask if mask.ndim == 2 else mask[..., 0]
    if gray.shape != image.shape[:2]:
        raise ValueError(f"mask {gray.shape} and image {image.shape[:2]} differ in size")
    glands = gray >= params.threshold
    border = _um_to_px(params.border_um, params.mpp)
    inside = ndi.distance_transform_edt(glands) > border
    outside = ndi.distance_transform_edt(~glands) > border
    lumen = ndi.binary_fill_holes(glands) & ~glands

    white, tissue = _whiteness(image, params)
    white_area = _um_to_px(_um_to_px(params.min_background_um2, params.mpp), params.mpp)
    bg = white & outside & ~lumen
    lab, n = ndi.label(bg)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        bg = sizes[lab] >= white_area
        bg[lab == 0] = False
    ring = _um_to_px(params.white_border_um, params.mpp)
    near_bg = ndi.distance_transform_edt(~bg) <= ring if bg.any() else np.zeros_like(bg)
    core_bg = ndi.distance_transform_edt(bg) > ring if bg.any() else np.zeros_like(bg)

    labels = np.zeros(gray.shape, dtype=np.uint8)
    labels[outside & ~lumen & tissue & ~white & ~near_bg] = stroma
    labels[core_bg] = background
    labels[inside] = epithelium
    return labels


def _whiteness(image: np.ndarray, p: Derivation) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {image.shape} {image.dtype}")
    rgb = ndi.median_filter(image[..., :3], size=(3, 3, 1)).astype(np.float32)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    sat = (hi - lo) / np.maximum(hi, 1.0)
    white = (lo >= p.white_min) & (sat < p.white_max_sat)
    tissue = (lo < p.tissue_max) | (sat >= p.tissue_min_sat)
    return white, tissue


def sparsify(labels: np.ndarray, rng: np.random.Generator, *, mpp: float = 1.0,
             params: Sparsity = Sparsity()) -> np.ndarray:
    """Sparse annotation simulated from dense ``labels`` (0 stays 0); ``rng`` decides which
    regions are kept and where their blobs lie."""
    out = np.zeros_like(labels)
    erode = _um_to_px(params.erode_um, mpp)
    blob = _um_to_px(params.blob_um, mpp)
    min_area = params.min_region_um2 / (mpp * mpp)
    rr, cc = np.indices(labels.shape)
    for value in np.unique(labels):
        if value == 0:
            continue
        interior = ndi.distance_transform_edt(np.pad(labels == value, 1))[1:-1, 1:-1] > erode
        regions, n = ndi.label(interior)
        if not n:
            continue
        sizes = np.bincount(regions.ravel(), minlength=n + 1)
        candidates = [k for k in range(1, n + 1) if sizes[k] >= min_area]
        if not candidates:
            continue
        n_keep = int(rng.binomial(len(candidates), params.keep_fraction))
        for k in rng.permutation(candidates)[:n_keep]:
            region = regions == k
            ys, xs = np.nonzero(region)
            i = int(rng.integers(len(ys)))
            disk = (rr - ys[i]) ** 2 + (cc - xs[i]) ** 2 <= blob * blob
            out[region & disk] = value
    return out


# Dense derivations by (image name, pixel hash, classes, parameters): the experiment loads the
# same crops for many runs in one process. A few thousand 224 px maps are a few hundred MB at most.
_CACHE: dict[tuple, np.ndarray] = {}
_CACHE_MAX = 4096


def image_seed(name: str, seed: int = 0) -> int:
    """A stable per-image seed (the same on every run and platform)."""
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


@dataclass(frozen=True)
class EbhiMapping:
    """A pairs mapping ``(mask, row, image) -> labels`` for :func:`training.data.load_pair`.

    ``epithelium(row)`` and ``stroma(row)`` give the label values of a row's image class,
    ``background`` that of near-white pixels. Sparse simulation applies to training rows only;
    rows whose ``split_column`` is ``val`` stay dense (the reference). The sparse draw of an
    image depends only on its path and ``seed``.
    """

    # load_pair hands the image to a mapping only when it asks for it: the derivation needs it.
    needs_image: ClassVar[bool] = True

    epithelium: Callable[[Mapping[str, str]], int]
    stroma: Callable[[Mapping[str, str]], int]
    background: int
    sparse: bool
    split_column: str = "split"
    image_column: str = "image"
    derivation: Derivation = Derivation()
    sparsity: Sparsity = Sparsity()
    seed: int = 0

    def __call__(self, mask: np.ndarray, row: Mapping[str, str], image: np.ndarray) -> np.ndarray:
        ep, st = self.epithelium(row), self.stroma(row)
        key = (row.get(self.image_column, ""), hash(image.tobytes()), hash(mask.tobytes()), ep,
               st, self.background, self.derivation)
        labels = _CACHE.get(key)
        if labels is None:
            labels = derive_labels(image, mask, epithelium=ep, stroma=st,
                                   background=self.background, params=self.derivation)
            if len(_CACHE) < _CACHE_MAX:
                _CACHE[key] = labels
        labels = labels.copy()
        if self.sparse and row.get(self.split_column) != "val":
            rng = np.random.default_rng(image_seed(row.get(self.image_column, ""), self.seed))
            labels = sparsify(labels, rng, mpp=self.derivation.mpp, params=self.sparsity)
        return labels


def mapping_for_set(s: Any, values: Mapping[str, int]):
    """The ``mapping = "ebhi"`` of a ``[[data.sets]]`` (a :class:`training.config.SetSection`)."""
    from .config import ConfigError

    if not s.foreground_column or not s.foreground_map:
        raise ConfigError('data.sets: mapping = "ebhi" needs foreground_column (e.g. "class") '
                          'and foreground_map = {Adenocarcinoma = "tumour", ...}')
    if not s.values:
        raise ConfigError('data.sets: mapping = "ebhi" needs values = {Adenocarcinoma = '
                          '"desmoplastic stroma", Normal = "lamina propria stroma"} '
                          "(the stroma class of each image class)")

    def pick(table: Mapping[str, str], what: str) -> Callable[[Mapping[str, str]], int]:
        def f(row: Mapping[str, str]) -> int:
            key = row.get(s.foreground_column)
            if key not in table:
                raise ConfigError(f"data.sets: {s.foreground_column} = {key!r} has no {what} "
                                  f"class; add it to {sorted(table)}")
            return values[table[key]] if table[key] else 0   # "" = leave unannotated
        return f

    return EbhiMapping(pick(s.foreground_map, "epithelium (foreground_map)"),
                       pick(s.values, "stroma (values)"),
                       values[s.background] if s.background else 0,
                       sparse=s.annotation == "sparse", split_column=s.split_column,
                       image_column=s.image_column,
                       derivation=Derivation(threshold=s.threshold,
                                             border_um=s.edge_ring_um))
