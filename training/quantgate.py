"""Accuracy gate of a low-precision twin: its label maps against the fp32 model's, whole slides.

Both models segment the same slides with ``wsiseg.pipeline.segment_slide`` (same tiles, CPU);
the fp32 map is the reference. Per class: Dice of the twin's pixels of that class against the
reference's; overall: the share of analysed pixels with the same label. The gate passes when
every class that covers at least ``min_class_px`` reference pixels keeps Dice >= 1 - max_drop and
the agreement is at least ``min_agreement``. Smaller classes are reported beside it.

The slides: the EBHI-Seg validation mosaic that ships as the demo, and a mosaic of the labelled
Kather et al. 2016 tiles (another lab and scanner; built here as a pyramidal TIFF at their
0.495 um/px). Neither is used to calibrate.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_SLIDE = ROOT / "examples" / "ebhi-val-mosaic.tif"
KATHER_DIR = ROOT.parent / "shared" / "data" / "kather-samples" / "labelled-2016"
KATHER_MPP = 0.495
GLASS = (242, 240, 243)


@dataclass(frozen=True)
class GateLimits:
    max_drop: float = 0.01        # per-class Dice of the twin vs fp32 labels >= 1 - max_drop
    min_agreement: float = 0.99   # share of pixels with the same label
    min_class_px: int = 1000      # classes with fewer reference pixels are reported, not gated,
    min_class_share: float = 0.05  # nor those under this share of the slide's pixels: there a
    # few hundred near-tie pixels swing Dice by more than the gate's 0.01


def mosaic_slide(tiles_dir: Path, out: Path, *, mpp: float = KATHER_MPP, cols: int = 6,
                 gap_px: int = 24) -> Path:
    """The images under ``tiles_dir`` (sorted, any depth) as one pyramidal RGB TIFF with gaps of
    glass, at ``mpp``."""
    import tifffile
    from skimage.io import imread

    paths = sorted(p for p in tiles_dir.rglob("*") if p.suffix.lower() in (".tif", ".png"))
    if not paths:
        raise FileNotFoundError(f"no .tif/.png tiles under {tiles_dir}; pass the tiles folder")
    tiles = [imread(p)[..., :3] for p in paths]
    size = max(max(t.shape[:2]) for t in tiles)
    rows = -(-len(tiles) // cols)
    rgb = np.empty((rows * size + (rows + 1) * gap_px, cols * size + (cols + 1) * gap_px, 3),
                   np.uint8)
    rgb[:] = GLASS
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap_px + r * (size + gap_px), gap_px + c * (size + gap_px)
        rgb[y:y + t.shape[0], x:x + t.shape[1]] = t
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(out) as tw:
        tw.write(rgb, photometric="rgb", tile=(256, 256), compression="zlib", metadata=None,
                 resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return out


def compare_labels(ref: np.ndarray, got: np.ndarray, names: list[str]) -> dict:
    """Per-class Dice of ``got`` against ``ref`` (values k + 1 = class k; 0 ignored) and the
    share of analysed pixels where they agree."""
    valid = (ref > 0) | (got > 0)
    n = len(names) + 1
    pair = np.bincount(ref[valid].astype(np.int64) * n + got[valid], minlength=n * n)
    table = pair.reshape(n, n)
    classes = {}
    for k, name in enumerate(names, start=1):
        both, in_ref, in_got = table[k, k], table[k].sum(), table[:, k].sum()
        classes[name] = {"dice": float(2 * both / (in_ref + in_got)) if in_ref + in_got else 1.0,
                         "ref_px": int(in_ref)}
    return {"agreement": float(np.trace(table) / max(1, table.sum())), "pixels": int(table.sum()),
            "classes": classes}


def _segment(slide: Path, model, out: Path) -> np.ndarray:
    import tifffile

    from wsiseg.pipeline import SegmentOptions, segment_slide

    from wsiseg.tissue import TissueParams

    # small tissue pieces count here: the Kather tiles are 74 um wide at 1 um/px
    options = SegmentOptions(device="cpu", tissue=TissueParams(min_tissue_um2=1000.0))
    segment_slide(slide, out, model=model, options=options, analysis=None)
    return tifffile.imread(out, key=0)


def judge(result: dict, limits: GateLimits) -> list[str]:
    """Reasons the result fails the gate (empty: it passes)."""
    fails = []
    if result["agreement"] < limits.min_agreement:
        fails.append(f"label agreement {result['agreement']:.4f} < {limits.min_agreement}")
    floor = max(limits.min_class_px, limits.min_class_share * result["pixels"])
    for name, c in result["classes"].items():
        if c["ref_px"] >= floor and c["dice"] < 1 - limits.max_drop:
            fails.append(f"{name} Dice {c['dice']:.4f} < {1 - limits.max_drop:.2f}")
    return fails


def run_gate(reference: str | Path, twin: str | Path, slides: dict[str, Path], *,
             limits: GateLimits = GateLimits()) -> dict:
    """Segment ``slides`` (name -> path) with both models and judge the twin on each."""
    from wsiseg.engine import load_model

    ref_model, twin_model = load_model(reference, device="cpu"), load_model(twin, device="cpu")
    if ref_model.contract.class_names != twin_model.contract.class_names:
        raise ValueError(f"{Path(twin).name} has other classes than {Path(reference).name}")
    names = ref_model.contract.class_names
    out: dict = {"reference": Path(reference).name, "twin": Path(twin).name,
                 "precision": twin_model.contract.precision, "limits": limits.__dict__,
                 "slides": {}}
    with tempfile.TemporaryDirectory(prefix="wsiseg-gate-") as tmp:
        for name, slide in slides.items():
            a = _segment(slide, ref_model, Path(tmp) / f"{name}.ref.tif")
            b = _segment(slide, twin_model, Path(tmp) / f"{name}.twin.tif")
            result = compare_labels(a, b, names)
            result["fails"] = judge(result, limits)
            out["slides"][name] = result
    out["passed"] = not any(r["fails"] for r in out["slides"].values())
    return out


def default_slides(tmp: Path, demo: Path = DEMO_SLIDE, kather: Path = KATHER_DIR
                   ) -> dict[str, Path]:
    """The demo slide and the Kather mosaic (built in ``tmp``)."""
    if not demo.is_file():
        raise FileNotFoundError(f"gate slide {demo} not found; pass --demo SLIDE")
    if not kather.is_dir():
        raise FileNotFoundError(f"labelled Kather tiles not found at {kather}; pass --kather DIR")
    return {"ebhi-val-mosaic": demo,
            "kather-2016-mosaic": mosaic_slide(kather, tmp / "kather-2016-mosaic.tif")}


def summary_lines(gate: dict) -> list[str]:
    lines = [f"{gate['twin']} ({gate['precision']}) vs {gate['reference']}: "
             + ("PASSED" if gate["passed"] else "FAILED")]
    for name, r in gate["slides"].items():
        dice = ", ".join(f"{k} {c['dice']:.4f}" for k, c in r["classes"].items() if c["ref_px"])
        lines.append(f"  {name}: agreement {r['agreement']:.4f}; Dice {dice}")
        lines += [f"    fails: {f}" for f in r["fails"]]
    return lines


class GateError(RuntimeError):
    """The twin failed its accuracy gate (and was removed)."""


def make_int8_twin(model: str | Path, cfg, out: str | Path | None = None, *,
                   n_images: int = 64, method: str = "minmax", exclude: tuple[str, ...] = (),
                   full_res_fp32: bool = True, gate: bool = True, demo: Path = DEMO_SLIDE,
                   kather: Path = KATHER_DIR) -> dict:
    """Quantise ``model`` (``wsiseg_train.quantize``) and gate the twin on the default slides.
    The gate's result is written beside the twin (``X.int8.gate.json``); a twin that fails it
    is removed (GateError)."""
    import json

    from wsiseg.contract import twin_path

    from .quantize import full_resolution_convs, head_node, quantize_int8

    out = Path(out) if out else twin_path(model, "int8")
    kept = full_resolution_convs(model) if full_res_fp32 else [head_node(model)]
    fp32_nodes = tuple(dict.fromkeys([*kept, *exclude]))
    result = quantize_int8(model, cfg, out, n_images=n_images, exclude=fp32_nodes,
                           method=method)
    if not gate:
        return result
    with tempfile.TemporaryDirectory(prefix="wsiseg-gate-") as tmp:
        result["gate"] = run_gate(model, out, default_slides(Path(tmp), demo, kather))
    report = out.with_name(out.name.removesuffix(".onnx") + ".gate.json")
    report.write_text(json.dumps(result, indent=2) + "\n")
    if not result["gate"]["passed"]:
        out.unlink()
        fails = [f for r in result["gate"]["slides"].values() for f in r["fails"]]
        raise GateError(f"{out.name} failed the accuracy gate ({'; '.join(fails)}) and was "
                        f"removed; see {report}; keep more nodes in fp32 with --exclude NODE")
    return result
