"""Class-first patch sampling (class -> annotated pixel -> jitter) and batch assembly.

A patch centre is drawn by picking a class (uniformly over the classes annotated in the set,
or with configured weights), then an annotated pixel of that class (uniformly over all such
pixels, each weighted by its set's ``weight``, so every item contributes by its annotated area
times that weight), then a uniform jitter of up to ``jitter_px`` in each direction. Rare
classes are therefore seen as often as common ones. When the run has both sparse and dense
items, each patch first picks the kind with the configured sparse:dense ratio (4:1 in the
paper's "combined" setting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .adipose import paste_adipose
from .aggregates import NucleusBank, paste
from .augment import AugmentConfig, class_stain, draw_class_stain, geometric, photometric
from .data import Item, read_region

MAX_POINTS = 200_000  # annotated pixels kept per class and item for sampling


@dataclass(frozen=True)
class ClassIndex:
    """Flat pixel indices of each class in each item (subsampled to MAX_POINTS)."""
    items: tuple[Item, ...]
    classes: tuple[int, ...]                     # class values present
    points: tuple[dict[int, np.ndarray], ...]    # per item: class value -> flat indices
    counts: np.ndarray                           # [n_items, n_classes_present] true pixel counts
    weights: np.ndarray                          # [n_items] each item's sampling weight


def class_index(items: list[Item], rng: np.random.Generator) -> ClassIndex:
    values = sorted({int(v) for it in items for v in np.unique(it.labels) if v})
    points, counts = [], np.zeros((len(items), len(values)), dtype=np.int64)
    for i, it in enumerate(items):
        flat = it.labels.ravel()
        per: dict[int, np.ndarray] = {}
        for j, v in enumerate(values):
            idx = np.flatnonzero(flat == v)
            counts[i, j] = idx.size
            if idx.size > MAX_POINTS:
                idx = np.sort(rng.choice(idx, MAX_POINTS, replace=False))
            per[v] = idx
        points.append(per)
    weights = np.array([it.weight for it in items], dtype=np.float64)
    return ClassIndex(tuple(items), tuple(values), tuple(points), counts, weights)


def class_probabilities(index: ClassIndex, weights: dict[int, float] | None) -> np.ndarray:
    p = np.array([(weights or {}).get(v, 1.0) if weights else 1.0 for v in index.classes],
                 dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError("class weights give zero probability to every annotated class")
    return p / p.sum()


def sample_center(index: ClassIndex, p_class: np.ndarray, jitter_px: int,
                  rng: np.random.Generator) -> tuple[int, int, int]:
    """(item number, row, col) of one patch centre, drawn class first."""
    j = int(rng.choice(len(index.classes), p=p_class))
    v = index.classes[j]
    per_item = index.counts[:, j] * index.weights
    i = int(rng.choice(len(index.items), p=per_item / per_item.sum()))
    pts = index.points[i][v]
    flat = int(pts[rng.integers(pts.size)])
    row, col = divmod(flat, index.items[i].labels.shape[1])
    if jitter_px > 0:
        row += int(rng.integers(-jitter_px, jitter_px + 1))
        col += int(rng.integers(-jitter_px, jitter_px + 1))
    return i, row, col


def extract(item: Item, row: int, col: int, size: int, mirror: bool = False,
            outside: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels of the ``size`` patch centred on (row, col); labels ``outside``
    (0 = unannotated) beyond the image's edge (the image white there, or mirrored:
    :func:`read_region`)."""
    r0, c0 = row - size // 2, col - size // 2
    labels = np.full((size, size), outside, dtype=np.uint8)
    h, w = item.labels.shape
    a, b, c, d = max(r0, 0), max(c0, 0), min(r0 + size, h), min(c0 + size, w)
    if c > a and d > b:
        labels[a - r0:c - r0, b - c0:d - c0] = item.labels[a:c, b:d]
    return read_region(item, r0, c0, size, mirror), labels


def _within(item: Item, row: int, col: int, size: int) -> np.ndarray:
    """``[size, size]`` bool: the pixels of the patch centred on (row, col) that lie inside
    the item's image (beyond its edge :func:`extract` shows white)."""
    h, w = item.labels.shape
    rows = np.arange(size) + row - size // 2
    cols = np.arange(size) + col - size // 2
    return ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]


GLASS_RGB = (np.array([236, 232, 238]), np.array([252, 250, 252]))  # range of empty glass


def mosaic(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One patch from four equal (image, labels) quadrants, in reading order."""
    (a, la), (b, lb), (c, lc), (d, ld) = parts
    return (np.concatenate([np.concatenate([a, b], 1), np.concatenate([c, d], 1)], 0),
            np.concatenate([np.concatenate([la, lb], 1), np.concatenate([lc, ld], 1)], 0))


def island(image: np.ndarray, labels: np.ndarray, side_px: int, background: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keep one ``side_px`` square window of the patch (at a random place) and replace the rest
    by glass: a near-white colour with a little noise, labelled ``background`` (0 = unannotated).
    The window's labels are kept: a class must not depend on tissue around it."""
    h, w = labels.shape
    side = min(side_px, h, w)
    r0, c0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    glass = rng.integers(GLASS_RGB[0], GLASS_RGB[1] + 1).astype(np.int16)
    out = np.clip(glass + rng.normal(0, 2.0, size=image.shape), 0, 255).astype(np.uint8)
    lab = np.full_like(labels, background)
    out[r0:r0 + side, c0:c0 + side] = image[r0:r0 + side, c0:c0 + side]
    lab[r0:r0 + side, c0:c0 + side] = labels[r0:r0 + side, c0:c0 + side]
    return out, lab


class TeacherBatch(NamedTuple):
    images: np.ndarray    # [n, 3, P, P] uint8, what the student is shown
    labels: np.ndarray    # [n, P, P] uint8
    teach: np.ndarray     # [n] bool: patches whose targets are the teacher's outputs
    shown: np.ndarray     # [n, 3, P, P] uint8, what the teacher is shown
    inside: np.ndarray    # [n, P, P] bool: pixels whose teacher's outputs are targets


class Sampler:
    """Draws augmented training batches from sparse and/or dense items."""

    def __init__(self, items: list[Item], *, patch_px: int, jitter_px: int,
                 sparse_dense_ratio: float, class_weights: dict[int, float] | None,
                 augment_cfg: AugmentConfig | None, rng: np.random.Generator,
                 mosaic_p: float = 0.0, island_p: float = 0.0,
                 island_px: tuple[int, int] = (48, 112), background: int = 0,
                 teacher_original_colour: bool = False, teacher_mirror_edge: bool = False,
                 outside_background: bool = False, aggregate_p: float = 0.0,
                 aggregates: tuple[NucleusBank, int] | None = None,
                 adipose_p: float = 0.0, mpp: float = 1.0,
                 class_stain_values: tuple[int, ...] = ()) -> None:
        if not items:
            raise ValueError("no training items: check the training sets and their split")
        self.patch_px, self.jitter_px, self.augment_cfg = patch_px, jitter_px, augment_cfg
        self.mosaic_p, self.island_p, self.island_px = mosaic_p, island_p, island_px
        self.background = background
        self.teacher_original_colour = teacher_original_colour
        self.teacher_mirror_edge = teacher_mirror_edge
        self.outside_background = outside_background
        if aggregate_p and aggregates is None:
            raise ValueError("aggregate_p needs aggregates = (nucleus bank, class value)")
        self.aggregate_p, self.aggregates = aggregate_p, aggregates
        if adipose_p and not background:
            raise ValueError("adipose_p needs background: the class value fat is labelled with")
        self.adipose_p, self.mpp = adipose_p, mpp
        if class_stain_values and not (augment_cfg and augment_cfg.class_stain_p):
            raise ValueError("class_stain_values need an augment config with class_stain_p > 0")
        self.class_stain_values = class_stain_values
        self.groups = []
        for kind in ("sparse", "dense"):
            group = [it for it in items if it.annotation == kind]
            if group and any(it.labels.any() for it in group):
                index = class_index(group, rng)
                self.groups.append((kind, index, class_probabilities(index, class_weights)))
        if not self.groups:
            raise ValueError("the training items have no annotated pixel (all labels are 0)")
        r = sparse_dense_ratio
        self.p_group = (np.array([r / (r + 1), 1 / (r + 1)]) if len(self.groups) == 2
                        else np.array([1.0]))

    def centers(self, n: int, rng: np.random.Generator) -> list[tuple[str, Item, int, int]]:
        out = []
        for _ in range(n):
            kind, index, p = self.groups[int(rng.choice(len(self.groups), p=self.p_group))]
            i, row, col = sample_center(index, p, self.jitter_px, rng)
            out.append((kind, index.items[i], row, col))
        return out

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``images [n, 3, P, P]`` uint8 and ``labels [n, P, P]`` uint8."""
        b = self.batch_with_teacher(n, rng)
        return b.images, b.labels

    def batch_with_teacher(self, n: int, rng: np.random.Generator) -> TeacherBatch:
        """:meth:`batch`, ``teach [n]`` bool: patches of a teacher set in their whole context
        (neither mosaic, island, aggregate nor adipose), whose targets are the teacher's outputs,
        and the images the teacher is shown: the same ones, or with ``teacher_original_colour`` each
        taught patch before its colour augmentation (same geometry), so that the student learns
        the teacher's calls on the training lab's colours under other stains; with
        ``teacher_mirror_edge`` the teacher's copy of a taught image pair's patch shows the
        image mirrored beyond its edge where the student's shows white (same geometry and
        colour draws), so that the student learns the teacher's calls in context near a crop's
        cut edge, and ``inside`` is False beyond that edge (the teacher's calls on mirrored
        tissue are no target for the student's glass). The stain of chosen classes
        (``class_stain_values``) is changed in the student's copy only: the teacher makes its
        calls on the patch as the lab stained it. What the teacher is shown draws no random
        numbers of its own: the student's patches are the same either way."""
        images, labels, teach, shown, inside = [], [], [], [], []
        separate = (self.teacher_original_colour or self.teacher_mirror_edge
                    or bool(self.class_stain_values))
        for _, item, row, col in self.centers(n, rng):
            plain = True
            if self.mosaic_p and rng.random() < self.mosaic_p:
                plain = False
                half = self.patch_px // 2
                others = [(it, r, c) for _, it, r, c in self.centers(3, rng)]
                img, lab = mosaic([extract(it, r, c, half)
                                   for it, r, c in [(item, row, col), *others]])
            else:
                outside = self.background if self.outside_background else 0  # edge's white
                img, lab = extract(item, row, col, self.patch_px, outside=outside)
            if self.aggregate_p and rng.random() < self.aggregate_p:
                plain = False
                img, lab = paste(img, lab, *self.aggregates, rng)
            elif self.adipose_p and rng.random() < self.adipose_p:  # never over an aggregate
                plain = False
                img, lab = paste_adipose(img, lab, self.background, self.mpp, rng)
            mirror = (self.teacher_mirror_edge and plain and item.teacher
                      and item.image is not None)
            if mirror:   # one geometry for all: the teacher's copy and the crop's extent ride
                # along as channels 3-5 and 6
                r0, c0, size = row - self.patch_px // 2, col - self.patch_px // 2, self.patch_px
                within = _within(item, row, col, size)
                img = np.concatenate([img, read_region(item, r0, c0, size, mirror=True),
                                      within[..., None].astype(np.uint8) * 255], axis=2)
            original, colour_rng = img, None
            if self.augment_cfg is not None:
                original, lab = geometric(img, lab, self.augment_cfg, rng)
                colour_rng = copy.deepcopy(rng) if mirror else None  # the same colour draws
            img = original[..., :3]
            if self.augment_cfg is not None:
                img = photometric(img, self.augment_cfg, rng)
            teacher_img = original[..., :3] if self.teacher_original_colour else img
            keep = np.ones(lab.shape, bool)
            if mirror:
                teacher_img, keep = original[..., 3:6], original[..., 6] >= 128
                if colour_rng is not None and not self.teacher_original_colour:
                    teacher_img = photometric(teacher_img, self.augment_cfg, colour_rng)
            if self.class_stain_values:
                scale = draw_class_stain(self.augment_cfg, rng)
                if scale is not None:
                    img = class_stain(img, lab, self.class_stain_values, scale)
            if self.island_p and rng.random() < self.island_p:  # glass is not colour-augmented
                plain = False
                side = int(rng.integers(self.island_px[0], self.island_px[1] + 1))
                img, lab = island(img, lab, side, self.background, rng)
            images.append(img.transpose(2, 0, 1))
            labels.append(lab)
            teach.append(plain and item.teacher)
            inside.append(keep)
            if separate:
                shown.append((teacher_img if plain and item.teacher else img).transpose(2, 0, 1))
        stacked = np.stack(images)
        return TeacherBatch(stacked, np.stack(labels), np.array(teach, bool),
                            np.stack(shown) if separate else stacked, np.stack(inside))


def validation_set(items: list[Item], *, patch_px: int, n_patches: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation set: whole images when they fit a patch, else class-first patches."""
    if not items:
        raise ValueError("no validation items: give some rows split = \"val\" (pairs) or items "
                         "with split = \"val\" (slides)")
    if all(it.labels.shape[0] <= patch_px and it.labels.shape[1] <= patch_px for it in items):
        pairs = [extract(it, patch_px // 2, patch_px // 2, patch_px) for it in items]
    else:
        rng = np.random.default_rng(seed)
        sampler = Sampler(items, patch_px=patch_px, jitter_px=0, sparse_dense_ratio=1.0,
                          class_weights=None, augment_cfg=None, rng=rng)
        pairs = [extract(it, r, c, patch_px) for _, it, r, c in sampler.centers(n_patches, rng)]
    return (np.stack([p[0].transpose(2, 0, 1) for p in pairs]), np.stack([p[1] for p in pairs]))
