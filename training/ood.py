"""Out-of-distribution evaluation of a model through the engine (``wsiseg-train evaluate-ood``).

Every figure comes from ``wsiseg.pipeline.segment_slide`` on a pyramidal TIFF slide with
resolution tags, read back from the written map: the reader, the tiling, the contract and the
stitching are all in the loop. Three kinds of slide are laid out from real crops:

- **Kather 2016** (``kather-samples/labelled-2016``, another lab and scanner, 0.495 µm/px,
  3 tiles per tissue type): each 150 px tile alone on glass; the call of a tile is the majority
  class over its central half. A check, never training data. The same tiles **in context**:
  each mirrored out to three times its side (tissue of its own kind all round, as in a slide),
  called over the same centre.
- **EBHI-Seg val** and **EBHI-Seg lesion val** (held-out patients): whole 224 px crops on glass;
  per-class Dice against the dense derived labels (``training/ebhi.py``), epithelium Dice
  (tumour or healthy glands against the gland mask), and the share of the lesions' non-gland
  tissue called tumour.
- **Context-free windows**: the central 112 µm of each val crop, alone on glass (as a small
  tile of another lab is seen), compared with the same pixels in the whole-crop map: a class
  must not flip when the surroundings are gone.

Tiles are run without the tissue mask (``--no-tissue-mask``): the small tiles are below the
default speck size, and the model's own calls, glass included, are what is measured.
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.io import imread

from wsiseg.engine import Model, load_model
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.writer import read_level, write_rgb_pyramid

from .ebhi import derive_labels
from .metrics import confusion, counts_from_confusion, dice_scores

GLASS = (242, 240, 243)
KATHER_MPP = 0.495
EBHI_MPP = 1.0
WINDOW_UM = 112
KATHER_TYPES = ("01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA",
                "07_ADIPOSE", "08_EMPTY")
NON_TUMOUR_TISSUE = ("02_STROMA", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE")
EPITHELIUM = ("tumour", "healthy glands")


@dataclass(frozen=True)
class Box:
    """Where a crop sits in a mosaic slide (slide pixels)."""
    row: int
    col: int
    h: int
    w: int

    def scaled(self, f: float) -> tuple[slice, slice]:
        """The box in a map whose pixels are ``f`` slide pixels each."""
        r0, c0 = int(round(self.row / f)), int(round(self.col / f))
        r1, c1 = int(round((self.row + self.h) / f)), int(round((self.col + self.w) / f))
        return slice(r0, r1), slice(c0, c1)


def lay_out(images: Sequence[np.ndarray], *, gap_px: int) -> tuple[np.ndarray, list[Box]]:
    """Images on a glass-coloured canvas in a near-square grid, ``gap_px`` apart."""
    if not images:
        raise ValueError("no images to lay out")
    cell_h = max(im.shape[0] for im in images) + gap_px
    cell_w = max(im.shape[1] for im in images) + gap_px
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = np.empty((rows * cell_h + gap_px, cols * cell_w + gap_px, 3), np.uint8)
    canvas[:] = GLASS
    boxes = []
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = gap_px + r * cell_h, gap_px + c * cell_w
        canvas[y:y + im.shape[0], x:x + im.shape[1]] = im[..., :3]
        boxes.append(Box(y, x, im.shape[0], im.shape[1]))
    return canvas, boxes


def segment_mosaic(model: Model, rgb: np.ndarray, *, mpp: float, workdir: Path,
                   name: str) -> tuple[np.ndarray, float, list[str]]:
    """Write ``rgb`` as a pyramidal TIFF slide at ``mpp``, segment it with ``wsiseg``'s
    pipeline, and return (label map, map pixel size in slide pixels, class names)."""
    slide = workdir / f"{name}.tif"
    write_rgb_pyramid(slide, rgb, mpp=mpp, software="wsiseg-train evaluate-ood")
    out = workdir / f"{name}-map.tif"
    report = segment_slide(slide, out, model=model, options=SegmentOptions(tissue=None),
                           analysis=None, overwrite=True)
    return read_level(out), report["map"]["mpp"] / mpp, model.contract.class_names


def class_counts(values: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label value 1..n in ``values`` (0, unannotated, not counted)."""
    return np.bincount(values.ravel(), minlength=n + 1)[1:]


def majority(values: np.ndarray, n: int) -> int:
    return int(class_counts(values, n).argmax() + 1)


def centre(sl: tuple[slice, slice], fraction: float = 0.5) -> tuple[slice, slice]:
    out = []
    for s in sl:
        n = s.stop - s.start
        m = max(1, int(round(n * (1 - fraction) / 2)))
        out.append(slice(s.start + m, s.stop - m))
    return out[0], out[1]


# -- Kather 2016 ---------------------------------------------------------------------------

def kather_calls(model: Model, folder: Path, workdir: Path, mpp: float = KATHER_MPP,
                 context: bool = False
                 ) -> tuple[list[str], list[str], np.ndarray, list[dict[str, float]]]:
    """Segment the labelled Kather tiles under ``folder`` as one mosaic slide: (tissue type of
    each tile, the model's call of each tile, the label map, the share of each class in each
    tile's centre, of which the call is the largest). ``mpp`` is the spacing the slide
    declares: the tiles' own (0.495 µm/px), or another to emulate a scanner or scale error.
    With ``context`` each tile is mirrored out to three times its side before it is laid out,
    so that it is seen inside tissue of its own kind, as in a slide, rather than alone on glass;
    the call is still made over the centre of the tile itself."""
    tiles = [(t, p) for t in KATHER_TYPES for p in sorted((folder / t).glob("*.tif"))]
    if not tiles:
        raise FileNotFoundError(f"no labelled Kather tiles under {folder}")
    images = [imread(p)[..., :3] for _, p in tiles]
    if context:
        images = [np.pad(im, ((im.shape[0],) * 2, (im.shape[1],) * 2, (0, 0)), mode="symmetric")
                  for im in images]
    rgb, boxes = lay_out(images, gap_px=images[0].shape[0])
    if context:   # the tile itself: the middle ninth of each mirrored block
        boxes = [Box(b.row + b.h // 3, b.col + b.w // 3, b.h // 3, b.w // 3) for b in boxes]
    name = "kather-context" if context else "kather"
    labels, f, names = segment_mosaic(model, rgb, mpp=mpp, workdir=workdir, name=name)
    calls, shares = [], []
    for b in boxes:
        counts = class_counts(labels[centre(b.scaled(f))], len(names))
        calls.append(names[int(counts.argmax())])          # the majority class of the centre
        shares.append({n: float(c) / max(int(counts.sum()), 1) for n, c in zip(names, counts)})
    return [t for t, _ in tiles], calls, labels, shares


def kather_check(model: Model, folder: Path, workdir: Path, mpp: float = KATHER_MPP,
                 context: bool = False) -> dict:
    types, calls, _, shares = kather_calls(model, folder, workdir, mpp, context)
    names = model.contract.class_names
    confusion: dict[str, dict[str, int]] = {t: {} for t in KATHER_TYPES}
    for t, call in zip(types, calls):
        confusion[t][call] = confusion[t].get(call, 0) + 1
    tumour = set(model.contract.tumour_classes)
    stroma = {n for n in names if "stroma" in n}
    non_tumour = [c for t, c in zip(types, calls) if t in NON_TUMOUR_TISSUE]
    by_type = {t: [c for tt, c in zip(types, calls) if tt == t] for t in KATHER_TYPES}
    return {"confusion": confusion, "classes": names, "mpp": mpp, "context": context,
            "tumour_classes": sorted(tumour), "non_tumour_tiles": len(non_tumour),
            "non_tumour_called_tumour": sum(c in tumour for c in non_tumour),
            "stroma_tiles": len(by_type["02_STROMA"]),
            "stroma_called_stroma": sum(c in stroma for c in by_type["02_STROMA"]),
            "tumour_tiles": len(by_type["01_TUMOR"]),
            "tumour_called_tumour": sum(c in tumour for c in by_type["01_TUMOR"]),
            # each tile's type, call and class shares of its centre: how close each call was
            "tiles": [{"type": t, "call": c, "shares": sh}
                      for t, c, sh in zip(types, calls, shares)]}


# -- EBHI-Seg val and lesion val ---------------------------------------------------------

@dataclass(frozen=True)
class Crop:
    name: str
    kind: str                 # the image class of EBHI-Seg
    image: np.ndarray
    glands: np.ndarray        # bool, mask >= 128
    labels: np.ndarray        # dense derived labels (class names below), 0 = unannotated


CROP_CLASSES = ("tumour", "desmoplastic stroma", "lamina propria stroma", "healthy glands",
                "background")
EPITHELIUM_OF = {"Adenocarcinoma": "tumour", "Normal": "healthy glands"}
STROMA_OF = {"Adenocarcinoma": "desmoplastic stroma"}  # every other kind: lamina propria


def load_crops(index: Path, *, limit: int = 0) -> list[Crop]:
    """The val rows of an EBHI-Seg index as crops with dense reference labels. Epithelium of
    kinds other than carcinoma and normal mucosa is left 0 in ``labels`` (see ``glands``)."""
    with index.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == "val"]
    if limit and len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    value = {n: i + 1 for i, n in enumerate(CROP_CLASSES)}
    crops = []
    for r in rows:
        image = imread(index.parent / r["image"])[..., :3]
        mask = imread(index.parent / r["label"])
        mask = mask if mask.ndim == 2 else mask[..., 0]
        epi = value.get(EPITHELIUM_OF.get(r["class"], ""), 0)
        stroma = value[STROMA_OF.get(r["class"], "lamina propria stroma")]
        labels = derive_labels(image, mask, epithelium=epi, stroma=stroma,
                               background=value["background"])
        crops.append(Crop(Path(r["image"]).name, r["class"], image, mask >= 128, labels))
    if not crops:
        raise ValueError(f"{index} has no val rows")
    return crops


def dice(a: np.ndarray, b: np.ndarray) -> float:
    d = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / d if d else math.nan


def crop_scores(crops: list[Crop], preds: list[np.ndarray], names: list[str]) -> dict:
    """Per-class Dice on labelled pixels, epithelium Dice on every pixel, and the share of
    non-gland tissue (labelled stroma) called tumour."""
    k = len(CROP_CLASSES)
    # model label value -> crop reference value (0: a model class the references do not have)
    to_ref = np.array([0] + [CROP_CLASSES.index(n) + 1 if n in CROP_CLASSES else 0
                             for n in names], np.uint8)
    conf = np.zeros((k, k + 1), np.int64)
    epi_inter = epi_sum = stroma_px = stroma_tumour = 0
    epi_values = [i + 1 for i, n in enumerate(names) if n in EPITHELIUM]
    tumour_v = names.index("tumour") + 1 if "tumour" in names else -1
    for crop, pred in zip(crops, preds):
        conf += confusion(to_ref[pred], crop.labels, k)
        epi = np.isin(pred, epi_values)
        epi_inter += int((epi & crop.glands).sum())
        epi_sum += int(epi.sum()) + int(crop.glands.sum())
        stroma = np.isin(crop.labels, [2, 3])
        stroma_px += int(stroma.sum())
        stroma_tumour += int((stroma & (pred == tumour_v)).sum())
    counts = counts_from_confusion(conf)
    dices, overall = dice_scores(counts)
    # a class absent from the references has no Dice here, even where the model predicts it
    per = {n: d if counts[i, 0] + counts[i, 2] else math.nan
           for i, (n, d) in enumerate(zip(CROP_CLASSES, dices))}
    return {"crops": len(crops), "dice": per, "overall": overall,
            "epithelium_dice": 2 * epi_inter / epi_sum if epi_sum else math.nan,
            "stroma_called_tumour": stroma_tumour / stroma_px if stroma_px else math.nan}


def crop_check(model: Model, crops: list[Crop], workdir: Path, name: str
               ) -> tuple[dict, list[np.ndarray], list[str]]:
    rgb, boxes = lay_out([c.image for c in crops], gap_px=64)
    labels, f, names = segment_mosaic(model, rgb, mpp=EBHI_MPP, workdir=workdir, name=name)
    preds = [labels[b.scaled(f)] for b in boxes]
    return crop_scores(crops, preds, names), preds, names


def window_check(model: Model, crops: list[Crop], in_context: list[np.ndarray],
                 workdir: Path) -> dict:
    """Centre windows of the crops alone on glass against the same pixels in context."""
    side = int(round(WINDOW_UM / EBHI_MPP))
    wins, ctx = [], []
    for crop, pred in zip(crops, in_context):
        h, w = crop.labels.shape
        r0, c0 = (h - side) // 2, (w - side) // 2
        if min(h, w) < side or pred.shape != crop.labels.shape:
            continue
        wins.append(crop.image[r0:r0 + side, c0:c0 + side])
        ctx.append(pred[r0:r0 + side, c0:c0 + side])
    rgb, boxes = lay_out(wins, gap_px=side)
    labels, f, names = segment_mosaic(model, rgb, mpp=EBHI_MPP, workdir=workdir, name="windows")
    n = len(names)
    flips = px_same = px_all = 0
    for b, ref in zip(boxes, ctx):
        alone = labels[b.scaled(f)]
        if alone.shape != ref.shape:
            continue
        c_alone, c_ref = centre((slice(0, side), slice(0, side)))
        flips += majority(alone[c_alone, c_ref], n) != majority(ref[c_alone, c_ref], n)
        px_same += int((alone == ref).sum())
        px_all += ref.size
    return {"windows": len(boxes), "window_um": WINDOW_UM, "flipped": flips,
            "flip_share": flips / len(boxes), "pixel_agreement": px_same / px_all}


def evaluate_ood(model: str | Path, data: Path, *, limit: int = 0, kather_mpp: float = KATHER_MPP,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    """All three checks for ``model`` with the real data under ``data`` (``shared/data``);
    ``kather_mpp``: the spacing the Kather mosaic declares (see :func:`kather_calls`)."""
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} not found")
    ebhi = data / "ebhi-seg"
    for need in (ebhi / "index.csv", ebhi / "index-lesions.csv",
                 data / "kather-samples" / "labelled-2016"):
        if not need.exists():
            raise FileNotFoundError(f"{need} not found; pass --data with the shared data folder")
    model = load_model(path, device="cpu")  # loaded once for every mosaic
    with tempfile.TemporaryDirectory(prefix="wsiseg-ood-") as tmp:
        work = Path(tmp)
        progress("Kather 2016 tiles")
        tiles = data / "kather-samples" / "labelled-2016"
        kather = kather_check(model, tiles, work, kather_mpp)
        progress("Kather 2016 tiles in context")
        kather_context = kather_check(model, tiles, work, kather_mpp, context=True)
        progress("EBHI-Seg val")
        val_crops = load_crops(ebhi / "index.csv", limit=limit)
        val, val_preds, _ = crop_check(model, val_crops, work, "ebhi-val")
        progress("EBHI-Seg lesion val")
        les_crops = load_crops(ebhi / "index-lesions.csv", limit=limit)
        lesions, les_preds, names = crop_check(model, les_crops, work, "ebhi-lesions")
        by_kind = {}
        for kind in sorted({c.kind for c in les_crops}):
            idx = [i for i, c in enumerate(les_crops) if c.kind == kind]
            s = crop_scores([les_crops[i] for i in idx], [les_preds[i] for i in idx], names)
            by_kind[kind] = {k: s[k] for k in ("crops", "epithelium_dice",
                                               "stroma_called_tumour")}
        lesions["by_kind"] = by_kind
        progress("context-free windows")
        windows = window_check(model, val_crops + les_crops, val_preds + les_preds, work)
    return {"model": path.name, "kather2016": kather, "kather2016_context": kather_context,
            "ebhi_val": val, "ebhi_lesion_val": lesions, "windows": windows}


# -- the table ---------------------------------------------------------------------------

def rows(result: dict) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of one result."""
    k, v, le, w = (result["kather2016"], result["ebhi_val"], result["ebhi_lesion_val"],
                   result["windows"])
    at = "" if k.get("mpp", KATHER_MPP) == KATHER_MPP else f" (laid out at {k['mpp']:g} µm/px)"
    out = [
        (f"Kather 2016{at}: non-tumour tissue tiles called tumour",
         f"{k['non_tumour_called_tumour']} / {k['non_tumour_tiles']}", "≤ 2"),
        (f"Kather 2016{at}: stroma tiles called stroma",
         f"{k['stroma_called_stroma']} / {k['stroma_tiles']}", "≥ 2"),
        (f"Kather 2016{at}: tumour tiles called tumour",
         f"{k['tumour_called_tumour']} / {k['tumour_tiles']}", "high"),
    ]
    if "kather2016_context" in result:   # tiles mirrored out to 3x their side
        kc = result["kather2016_context"]
        out += [(f"Kather 2016{at} in context: non-tumour tissue tiles called tumour",
                 f"{kc['non_tumour_called_tumour']} / {kc['non_tumour_tiles']}", "low"),
                (f"Kather 2016{at} in context: stroma tiles called stroma",
                 f"{kc['stroma_called_stroma']} / {kc['stroma_tiles']}", "high"),
                (f"Kather 2016{at} in context: tumour tiles called tumour",
                 f"{kc['tumour_called_tumour']} / {kc['tumour_tiles']}", "high")]
    out.append(("EBHI val: overall Dice", f"{v['overall']:.3f}", "≥ 0.85"))
    out += [(f"EBHI val: {n} Dice", f"{d:.3f}", "≥ 0.92" if n == "tumour" else "high")
            for n, d in v["dice"].items() if not math.isnan(d)]
    out += [("EBHI val: epithelium Dice", f"{v['epithelium_dice']:.3f}", "≥ 0.92"),
            ("EBHI lesion val: epithelium Dice", f"{le['epithelium_dice']:.3f}", "≥ 0.92"),
            ("EBHI lesion val: non-gland tissue called tumour",
             f"{le['stroma_called_tumour']:.3f}", "low"),
            (f"Context-free {w['window_um']} µm windows: class flipped",
             f"{w['flipped']} / {w['windows']} ({w['flip_share']:.3f})", "low"),
            ("Context-free windows: pixel agreement with context",
             f"{w['pixel_agreement']:.3f}", "high")]
    return out


def markdown(results: Sequence[dict]) -> str:
    """One Markdown table: a column per model, then the goal; and each Kather confusion."""
    names = [r["model"] for r in results]
    table = [rows(r) for r in results]
    lines = ["| figure | " + " | ".join(names) + " | goal |",
             "|---|" + "---:|" * len(names) + "---|"]
    for i, (label, _, goal) in enumerate(table[0]):
        lines.append(f"| {label} | " + " | ".join(t[i][1] for t in table) + f" | {goal} |")
    for r in results:
        k = r["kather2016"]
        lines += ["", f"Kather 2016 tile calls of {r['model']} (rows: tissue type, 3 tiles each):",
                  "", "| type | " + " | ".join(k["classes"]) + " |",
                  "|---|" + "---:|" * len(k["classes"])]
        for t, calls in k["confusion"].items():
            lines.append(f"| {t} | " + " | ".join(str(calls.get(c, 0)) for c in k["classes"])
                         + " |")
        for key, where in (("kather2016", ""), ("kather2016_context", " in context")):
            close = [(t["type"], t["call"], t["shares"][t["call"]])
                     for t in r.get(key, {}).get("tiles", [])
                     if t["type"] in NON_TUMOUR_TISSUE and t["call"] in k["tumour_classes"]]
            if close:
                lines += ["", f"Non-tumour tiles{where} called tumour, with the share of the "
                          "tile's centre called so: "
                          + ", ".join(f"{t} {c} {v:.2f}" for t, c, v in close) + "."]
    return "\n".join(lines) + "\n"
