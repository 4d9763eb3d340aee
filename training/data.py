"""Training sets: labelled images at the model's mpp, from image/mask pairs or whole slides.

An :class:`Item` is one labelled image: its label map (uint8, 0 = unannotated, ``k`` = class
``k``) at the model mpp, and either the image pixels (pairs) or an open slide that is read at
the model mpp on demand. Three sources:

- ``pairs``: image + mask files listed in a CSV; a mapping function turns a mask (and its CSV
  row) into labels (:func:`threshold_mapping`, :func:`value_mapping`);
- ``slide_labels``: a slide + a label raster at a known mpp (values mapped to classes);
- ``slide_annotations``: a slide + QuPath GeoJSON or ASAP XML polygons.

:class:`TrainingData` owns the slide handles (a context manager).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.io import imread
from skimage.transform import rescale

from wsiseg.labels import resize_nearest

from .annotations import rasterize, read_annotations

if TYPE_CHECKING:
    from wsiseg.slide import ReadPlan, Slide

Mapping_ = Callable[[np.ndarray, Mapping[str, str]], np.ndarray]
# Slides are read on the engine's grid for the model mpp itself: a level or block mean is used
# as is only when it lands on that grid (up to float rounding), else the engine resamples. The
# labels are rasterised on the same grid.
GRID_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Item:
    name: str
    labels: np.ndarray                   # [rows, cols] uint8 at the model mpp
    annotation: str = "dense"            # dense | sparse
    image: np.ndarray | None = None      # [rows, cols, 3] uint8 at the model mpp (pairs)
    slide: Slide | None = None           # the open slide (slides)
    plan: ReadPlan | None = None         # how the slide is read at the model mpp (slides)
    weight: float = 1.0                  # sampling weight per annotated pixel (its set's)
    teacher: bool = False                # whole-context patches learn train.teacher's outputs


def threshold_mapping(threshold: int, foreground: str | Callable[[Mapping[str, str]], int],
                      background: int = 0) -> Mapping_:
    """mask >= threshold -> the foreground value (fixed, or chosen from the CSV row)."""
    def mapping(mask: np.ndarray, row: Mapping[str, str]) -> np.ndarray:
        fg = foreground(row) if callable(foreground) else foreground
        gray = mask if mask.ndim == 2 else mask[..., 0]
        return np.where(gray >= threshold, fg, background).astype(np.uint8)
    return mapping


def value_mapping(values: Mapping[int, int]) -> Mapping_:
    """Each listed mask value -> a label value; unlisted values -> 0 (unannotated)."""
    lut = np.zeros(256, dtype=np.uint8)
    for k, v in values.items():
        lut[int(k)] = v

    def mapping(mask: np.ndarray, row: Mapping[str, str]) -> np.ndarray:
        gray = mask if mask.ndim == 2 else mask[..., 0]
        if gray.dtype != np.uint8:
            raise ValueError(f"masks must be 8-bit for a value mapping, got {gray.dtype}")
        return lut[gray]
    return mapping


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected 8-bit RGB, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def read_pairs_csv(index: str | Path, *, image_column: str = "image",
                   mask_column: str = "label") -> list[dict[str, str]]:
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"pairs index {index} not found")
    with index.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for col in (image_column, mask_column):
        if rows and col not in rows[0]:
            raise ValueError(f"{index}: no column {col!r} (columns: {', '.join(rows[0])}); "
                             "set image_column / mask_column")
    return rows


def rescale_rgb(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 RGB resized by ``scale`` (bilinear, anti-aliased when shrinking): pair images
    whose mpp differs from the model's."""
    return (rescale(image, scale, order=1, channel_axis=-1, preserve_range=True,
                    anti_aliasing=scale < 1) + 0.5).astype(np.uint8)


def load_pair(image_path: Path, mask_path: Path, mapping: Mapping_, row: Mapping[str, str],
              *, scale: float = 1.0, annotation: str = "dense") -> Item:
    image = _rgb(imread(image_path), str(image_path))
    mask = imread(mask_path)
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image_path.name} is {image.shape[1]}x{image.shape[0]} px but "
                         f"its mask {mask_path.name} is {mask.shape[1]}x{mask.shape[0]} px; "
                         "image and mask must have the same size")
    # a mapping with needs_image = True also sees the image (e.g. training/ebhi.py)
    if getattr(mapping, "needs_image", False):
        labels = mapping(mask, row, image)
    else:
        labels = mapping(mask, row)
    if scale != 1.0:
        image = rescale_rgb(image, scale)
        labels = rescale(labels, scale, order=0, preserve_range=True,
                         anti_aliasing=False).astype(np.uint8)
    return Item(image_path.name, labels, annotation, image=image)


def load_pairs(index: str | Path, mapping: Mapping_, *, split: str | None = None,
               split_column: str = "split", image_column: str = "image",
               mask_column: str = "label", limit: int = 0, scale: float = 1.0,
               annotation: str = "dense") -> list[Item]:
    """Items from a CSV of image/mask paths (relative to the CSV); ``split`` filters rows and
    ``limit`` keeps that many evenly spaced rows."""
    rows = read_pairs_csv(index, image_column=image_column, mask_column=mask_column)
    if split is not None and split_column:
        rows = [r for r in rows if r.get(split_column) == split]
    if limit and len(rows) > limit:  # an evenly spaced subset keeps the mix of the full list
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    base = Path(index).parent
    return [load_pair(base / r[image_column], base / r[mask_column], mapping, r,
                      scale=scale, annotation=annotation) for r in rows]


def mirrored(index: np.ndarray, n: int) -> np.ndarray:
    """Positions ``index`` folded into ``[0, n)`` by mirroring at the edges (edge pixel
    repeated: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...), for any distance outside."""
    period = np.mod(index, 2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


def read_region(item: Item, row: int, col: int, size: int, mirror: bool = False) -> np.ndarray:
    """RGB ``[size, size, 3]`` uint8 of ``item`` at the model mpp, top-left (row, col).

    Image pairs: white outside the image, or with ``mirror`` the image mirrored at its edges.
    Slides: read by the engine's reader (:meth:`wsiseg.slide.Slide.read`), so outside the slide
    and its transparent pixels are the slide's background colour, as in inference (``mirror``
    does not apply: a slide has its own surroundings).
    """
    if item.image is not None and mirror:
        h, w = item.image.shape[:2]
        rows = mirrored(np.arange(row, row + size), h)
        return item.image[np.ix_(rows, mirrored(np.arange(col, col + size), w))]
    if item.image is not None:
        out = np.full((size, size, 3), 255, dtype=np.uint8)
        h, w = item.image.shape[:2]
        r0, c0, r1, c1 = max(row, 0), max(col, 0), min(row + size, h), min(col + size, w)
        if r1 > r0 and c1 > c0:
            out[r0 - row:r1 - row, c0 - col:c1 - col] = item.image[r0:r1, c0:c1]
        return out
    return item.slide.read(item.plan, row, col, size, size)[0]


class TrainingData:
    """Train and validation items; closes the slides it opened."""

    def __init__(self, train: list[Item], val: list[Item], slides: list[Any] = ()) -> None:
        self.train, self.val, self._slides = train, val, list(slides)

    def close(self) -> None:
        for s in self._slides:
            s.close()
        self._slides = []

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_slide(path: Path, override: float | None) -> Slide:
    """The slide at ``path`` through the engine's reader; its mpp from the slide's own
    metadata (OpenSlide's, vendor or TIFF keys) unless the config gives ``slide_mpp``."""
    from wsiseg.slide import MppMissing, Slide  # only slides need it

    if not path.exists():
        raise FileNotFoundError(f"slide {path} not found")
    try:
        return Slide(path, mpp=override or None)
    except MppMissing:
        raise ValueError(f"slide {path.name} does not record its pixel size; give slide_mpp "
                         "(microns per pixel at level 0) in its item of the config") from None


def _fit(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``labels`` cropped or padded (with 0, unannotated) to ``shape``."""
    out = np.zeros(shape, dtype=np.uint8)
    h, w = min(shape[0], labels.shape[0]), min(shape[1], labels.shape[1])
    out[:h, :w] = labels[:h, :w]
    return out


def load_slide_item(item: Mapping[str, Any], *, model_mpp: float, annotation: str,
                    values: Mapping[int, int] | None = None,
                    class_map: Mapping[str, int | None] | None = None) -> Item:
    """One slide with a label raster (``labels``) or polygon annotations (``annotations``).

    Pixels and labels share one grid: the engine's read plan for the model mpp itself
    (``GRID_TOLERANCE``), so that the labels are at the model mpp."""
    path = Path(item["slide"])
    slide = open_slide(path, item.get("slide_mpp"))
    try:
        if "annotations" not in item and "labels" not in item:
            raise ValueError(f"{path.name}: a slide item needs 'labels' (a label raster) or "
                             "'annotations' (GeoJSON / ASAP XML)")
        if "annotations" not in item and not item.get("labels_mpp"):
            raise ValueError(f"{path.name}: give labels_mpp (microns per pixel of the label "
                             "raster) in its item of the config")
        plan = slide.plan(model_mpp, tolerance=GRID_TOLERANCE)
        if "annotations" in item:
            labels = rasterize(read_annotations(item["annotations"]), class_map or {},
                               slide.info.l0_size, slide.info.mpp / plan.mpp,
                               source=Path(item["annotations"]).name)
            labels = _fit(labels, plan.out_shape)
        else:
            raster = imread(item["labels"])
            raster = raster if raster.ndim == 2 else raster[..., 0]
            if values:
                lut = np.zeros(256, dtype=np.uint8)
                for k, v in values.items():
                    lut[int(k)] = v
                raster = lut[raster]
            # raster pixels per model pixel
            labels = resize_nearest(raster, plan.out_shape,
                                    factor=plan.mpp / float(item["labels_mpp"]))
    except BaseException:
        slide.close()
        raise
    return Item(path.name, labels.astype(np.uint8), annotation, slide=slide, plan=plan)
