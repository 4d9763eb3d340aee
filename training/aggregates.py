"""Lymphoid-aggregate patches built from the training data's own immune-cell nuclei.

Sheets of lymphocytes (lymphoid aggregates and follicles, dense infiltrates) are common in
colorectal resections but absent from biopsy crop sets such as EBHI-Seg, and a model that has
never seen densely packed small round nuclei calls them tumour. The mucosal stroma of those
crops does hold the cells themselves, scattered: this module cuts them out and packs them.

- :class:`NucleusBank` finds, in each image pair's pixels of one class (lamina propria stroma),
  small round dark nuclei on the haematoxylin channel (``skimage.color.rgb2hed``, Otsu
  threshold within the class) and keeps each with a soft mask, plus the colour of the stroma
  between them, so that one aggregate is made of one crop's cells in its own stain.
- :func:`aggregate` lays them on a jittered hexagonal grid (7-9 µm apart, the spacing of
  lymphocytes in a follicle) over a pale background between the crop's stroma colour and its
  lightest pixels.
- :func:`paste` puts an aggregate into a training patch inside an irregular blob (or over all of
  it) and labels the blob with the class; the patch's other labels stay.

Sizes are in micrometres and converted with the training mpp.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import color, filters, measure, morphology, transform

NUCLEUS_AREA_UM2 = (12.0, 70.0)    # small round nuclei (lymphocytes are 5-9 um across)
SPACING_UM = (7.0, 9.0)           # centre to centre in a dense sheet
MAX_ECCENTRICITY = 0.85
MIN_SOLIDITY = 0.85
MIN_NUCLEI = 8                    # per crop, else the crop is not used
MIN_CLASS_PX = 2000               # class pixels a crop needs to be searched
MAX_SOURCES = 400                 # crops searched (evenly spaced over the items)


@dataclass(frozen=True)
class Source:
    nuclei: tuple[tuple[np.ndarray, np.ndarray], ...]   # (rgb float [h, w, 3], alpha [h, w])
    stroma: np.ndarray                                  # median RGB of the class between nuclei
    light: np.ndarray                                   # 90th percentile RGB of the same


def find_nuclei(image: np.ndarray, region: np.ndarray, mpp: float) -> Source | None:
    """The small round dark nuclei of ``image`` inside ``region`` (bool), or None if too few."""
    inner = morphology.erosion(region, morphology.disk(3))
    if inner.sum() < MIN_CLASS_PX:
        return None
    haem = color.rgb2hed(image)[..., 0]
    nuc = (haem > filters.threshold_otsu(haem[inner])) & inner
    nuc = morphology.opening(nuc, morphology.disk(1))
    labelled = measure.label(nuc)
    lo, hi = (a / mpp ** 2 for a in NUCLEUS_AREA_UM2)
    found = []
    for p in measure.regionprops(labelled, intensity_image=haem):
        if lo <= p.area <= hi and p.eccentricity < MAX_ECCENTRICITY and p.solidity > MIN_SOLIDITY:
            found.append(p)
    if len(found) < MIN_NUCLEI:
        return None
    dark = np.median([p.intensity_mean for p in found])
    h, w = region.shape
    nuclei = []
    for p in found:
        if p.intensity_mean < dark:       # the darker half: lymphocytes rather than fibroblasts
            continue
        r0, c0, r1, c1 = p.bbox
        r0, c0, r1, c1 = max(r0 - 1, 0), max(c0 - 1, 0), min(r1 + 1, h), min(c1 + 1, w)
        alpha = filters.gaussian((labelled[r0:r1, c0:c1] == p.label).astype(float), 0.6)
        alpha = np.clip((alpha - 0.15) * 1.6, 0.0, 1.0)
        nuclei.append((image[r0:r1, c0:c1].astype(float), alpha))
    between = image[inner & ~morphology.dilation(nuc, morphology.disk(2))]
    if len(between) < 100:
        return None
    return Source(tuple(nuclei), np.median(between, 0), np.percentile(between, 90, axis=0))


class NucleusBank:
    """Nuclei of one class's pixels in image pairs, grouped by crop."""

    def __init__(self, sources: list[Source], mpp: float) -> None:
        if not sources:
            raise ValueError("no training crop has enough small round nuclei in the aggregate "
                             "class to build lymphoid-aggregate patches: set data.aggregate_p "
                             "= 0 or choose a stroma class with immune cells "
                             "(data.aggregate_class)")
        self.sources, self.mpp = sources, mpp

    @classmethod
    def from_items(cls, items, value: int, mpp: float) -> NucleusBank:
        pairs = [it for it in items if it.image is not None and (it.labels == value).any()]
        step = max(1, len(pairs) // MAX_SOURCES)
        sources = [find_nuclei(it.image, it.labels == value, mpp) for it in pairs[::step]]
        return cls([s for s in sources if s is not None], mpp)

    def __len__(self) -> int:
        return len(self.sources)


def aggregate(size: int, source: Source, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` RGB uint8 sheet of ``source``'s nuclei."""
    pale = rng.uniform(0.2, 0.9)
    base = source.stroma * (1 - pale) + source.light * pale
    canvas = base + rng.normal(0, 6, (size, size, 3))
    canvas = filters.gaussian(canvas, 1.0, channel_axis=-1, preserve_range=True)
    spacing = rng.uniform(*SPACING_UM) / mpp
    fill = rng.uniform(0.85, 1.0)
    points = []
    for i, y in enumerate(np.arange(-spacing, size + spacing, spacing * 0.866)):
        for x in np.arange(-spacing + (i % 2) * spacing / 2, size + spacing, spacing):
            if rng.random() < fill:
                points.append((y + rng.normal(0, spacing * 0.15),
                               x + rng.normal(0, spacing * 0.15)))
    # one scale per sheet (the source's median nucleus to the grid spacing), each nucleus
    # rescaled once
    diameters = [max(2 * np.sqrt(a.sum() / np.pi), 3.0) for _, a in source.nuclei]
    scale = spacing / float(np.median(diameters)) * rng.uniform(0.95, 1.15)
    cells = [(transform.rescale(rgb, scale, channel_axis=-1, preserve_range=True),
              transform.rescale(alpha, scale)) for rgb, alpha in source.nuclei]
    for j in rng.permutation(len(points)):
        y, x = points[j]
        rgb, alpha = cells[int(rng.integers(len(cells)))]
        k = int(rng.integers(4))
        rgb, alpha = np.rot90(rgb, k), np.rot90(alpha, k)
        h, w = alpha.shape
        r, c = int(y - h / 2), int(x - w / 2)
        a, b, e, d = max(r, 0), max(c, 0), min(r + h, size), min(c + w, size)
        if e <= a or d <= b:
            continue
        al = alpha[a - r:e - r, b - c:d - c, None]
        canvas[a:e, b:d] = canvas[a:e, b:d] * (1 - al) + rgb[a - r:e - r, b - c:d - c] * al
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular filled region of a ``size`` square (bool): a wobbly rotated ellipse, or
    (one time in three) all of it."""
    if rng.random() < 1 / 3:
        return np.ones((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    ay, ax = rng.uniform(0.2, 0.6, 2) * size
    t = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
    wobble = filters.gaussian(rng.normal(0, 1, (size, size)), size / 12)
    wobble /= max(np.abs(wobble).max(), 1e-6)
    return (u / ay) ** 2 + (v / ax) ** 2 < 1 + 0.4 * wobble


def paste_sheet(image: np.ndarray, labels: np.ndarray, sheet: np.ndarray, value: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``image``/``labels`` with ``sheet`` (same size) inside a :func:`blob`, labelled
    ``value``; the rest stays."""
    region = blob(labels.shape[0], rng)
    image, labels = image.copy(), labels.copy()
    image[region] = sheet[region]
    labels[region] = value
    return image, labels


def paste(image: np.ndarray, labels: np.ndarray, bank: NucleusBank, value: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image``/``labels`` with a lymphoid aggregate inside a blob, labelled ``value``."""
    size = labels.shape[0]
    if labels.shape[1] != size:
        raise ValueError("aggregate patches must be square")
    source = bank.sources[int(rng.integers(len(bank)))]
    return paste_sheet(image, labels, aggregate(size, source, bank.mpp, rng), value, rng)
