"""Build examples/ebhi-val-mosaic.tif: a small colorectal demo slide from EBHI-Seg val crops.

    python examples/make_colorectal_demo.py [--data EBHI_SEG_FOLDER] [-o OUT.tif]

The crops are real H&E of colorectal biopsies (EBHI-Seg, Shi et al., Front. Med. 2023,
doi:10.3389/fmed.2023.1114673, CC BY 4.0), taken only from the validation patients, never
from the crops the default model was trained on. Adenocarcinoma crops fill the upper rows and
normal mucosa crops the lower rows, patient by patient, separated by strips of glass-coloured
background. The file is a tiled pyramidal RGB TIFF (zlib with horizontal predictor, 256 px
tiles, levels halved down to under 512 px) with its pixel size in the resolution tags, which
OpenSlide opens as a generic TIFF. EBHI-Seg's pixel size is not published: 1 um/px is assumed,
as in the model card. The same inputs give a byte-identical file.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from wsiseg.writer import write_rgb_pyramid

ROOT = Path(__file__).resolve().parents[1]
GLASS = (242, 240, 243)          # the colour of empty glass on a bright-field scan
GAP_PX = 24
COLS = 4
PER_CLASS = {"Adenocarcinoma": 12, "Normal": 8}


def pick(index: Path) -> list[dict[str, str]]:
    """PER_CLASS val crops of each class, taken round-robin over the patients (sorted), so that
    as many patients as possible are shown; grouped by patient in the mosaic."""
    with index.open(newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    out = []
    for cls, n in PER_CLASS.items():
        by_patient: dict[str, list[dict[str, str]]] = {}
        for r in sorted(rows, key=lambda r: (r["patient"], r["image"])):
            if r["split"] == "val" and r["class"] == cls:
                by_patient.setdefault(r["patient"], []).append(r)
        chosen: list[dict[str, str]] = []
        for i in range(max(map(len, by_patient.values()), default=0)):
            chosen += [crops[i] for crops in by_patient.values() if i < len(crops)]
        if len(chosen) < n:
            raise SystemExit(f"{index}: only {len(chosen)} val crops of {cls}, need {n}")
        out += sorted(chosen[:n], key=lambda r: (r["patient"], r["image"]))
    return out


def mosaic(rows: list[dict[str, str]], data: Path) -> np.ndarray:
    crops = [np.asarray(Image.open(data / r["image"]).convert("RGB")) for r in rows]
    size = crops[0].shape[0]
    n_rows = -(-len(crops) // COLS)
    h, w = n_rows * size + (n_rows + 1) * GAP_PX, COLS * size + (COLS + 1) * GAP_PX
    out = np.empty((h, w, 3), np.uint8)
    out[:] = GLASS
    for i, crop in enumerate(crops):
        r, c = divmod(i, COLS)
        y, x = GAP_PX + r * (size + GAP_PX), GAP_PX + c * (size + GAP_PX)
        out[y:y + size, x:x + size] = crop
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ebhi-seg")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "examples" / "ebhi-val-mosaic.tif")
    args = p.parse_args()
    index = args.data / "index.csv"
    if not index.is_file():
        raise SystemExit(f"EBHI-Seg index not found at {index}; pass --data FOLDER")
    rows = pick(index)
    rgb = mosaic(rows, args.data)
    write_rgb_pyramid(args.out, rgb, mpp=1.0,
                      software="wsiseg examples/make_colorectal_demo.py")
    print(f"wrote {args.out} ({rgb.shape[1]} x {rgb.shape[0]} px at 1 um/px, "
          f"{args.out.stat().st_size / 1e6:.1f} MB) from {len(rows)} val crops of "
          f"{len({r['patient'] for r in rows})} patients")
    for r in rows:
        print(f"  {r['class']:<15} {r['patient']:<12} {Path(r['image']).name}")


if __name__ == "__main__":
    main()
