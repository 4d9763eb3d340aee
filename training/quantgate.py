"""Accuracy gate of a low-precision twin against its fp32 model, through the engine.

Both models segment the same slides with ``wsiseg.pipeline.segment_slide`` on the CPU (the
mosaic slides of ``wsiseg_train.ood``), and the twin passes when, on every slide, at least
``min_agreement`` of the pixels keep the fp32 label, and:

- **EBHI-Seg val** (the held-out patients' crops as one mosaic, with their dense derived
  labels): no class's Dice against the labels, nor the epithelium Dice, is more than
  ``max_drop`` below the fp32 model's;
- **Kather 2016** (the 24 labelled tiles of another lab as one mosaic at 0.495 µm/px): no tile's
  call (the majority class over its centre) changes.

Other slides (``slides=``; e.g. a synthetic one in the tests) are judged on agreement alone.
Neither data set is used to calibrate the twin (that reads train-split crops).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.engine import load_model
from wsiseg.files import write_text_atomic
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.writer import read_level

from .ood import crop_check, kather_calls, load_crops

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class GateLimits:
    max_drop: float = 0.01        # Dice against the labels may fall by at most this
    min_agreement: float = 0.99   # share of pixels with the fp32 label


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, int]:
    """Share of the pixels analysed by either map (value > 0) that carry the same value."""
    valid = (ref > 0) | (got > 0)
    n = int(valid.sum())
    return (float((ref[valid] == got[valid]).sum() / n) if n else 1.0), n


def _agreement_fails(share: float, limits: GateLimits) -> list[str]:
    return [f"label agreement {share:.4f} < {limits.min_agreement}"] \
        if share < limits.min_agreement else []


def dice_fails(dice: dict[str, dict[str, float]], limits: GateLimits) -> list[str]:
    """The classes whose Dice against the labels fell by more than ``max_drop``."""
    return [f"{name} Dice {d['twin']:.4f} < fp32 {d['fp32']:.4f} - {limits.max_drop}"
            for name, d in dice.items() if d["twin"] < d["fp32"] - limits.max_drop]


def ebhi_check(ref, twin, crops, work: Path, limits: GateLimits) -> dict:
    """Dice against the EBHI-Seg labels of both models, and their label agreement."""
    s_ref, p_ref, _ = crop_check(ref, crops, work, "gate-ebhi-fp32")
    s_twin, p_twin, _ = crop_check(twin, crops, work, "gate-ebhi-twin")
    share, n = agreement(np.concatenate([p.ravel() for p in p_ref]),
                         np.concatenate([p.ravel() for p in p_twin]))
    dice = {name: {"fp32": d, "twin": s_twin["dice"][name]}
            for name, d in s_ref["dice"].items() if not math.isnan(d)}
    dice["epithelium"] = {"fp32": s_ref["epithelium_dice"], "twin": s_twin["epithelium_dice"]}
    fails = _agreement_fails(share, limits) + dice_fails(dice, limits)
    return {"crops": len(crops), "agreement": share, "pixels": n, "dice": dice, "fails": fails}


def kather_gate(ref, twin, folder: Path, work: Path, limits: GateLimits) -> dict:
    """Tile calls of both models on the labelled Kather tiles, and their label agreement."""
    types, calls_ref, map_ref, _ = kather_calls(ref, folder, work)
    _, calls_twin, map_twin, _ = kather_calls(twin, folder, work)
    share, n = agreement(map_ref, map_twin)
    changed = [f"{t} tile {i}: {a} -> {b}" for i, (t, a, b)
               in enumerate(zip(types, calls_ref, calls_twin)) if a != b]
    fails = _agreement_fails(share, limits) + [f"call changed: {c}" for c in changed]
    return {"tiles": len(types), "agreement": share, "pixels": n,
            "calls_unchanged": len(types) - len(changed), "fails": fails}


def slide_check(ref, twin, slide: Path, work: Path, limits: GateLimits) -> dict:
    """Label agreement of both models on any slide."""
    maps = []
    for tag, model in (("fp32", ref), ("twin", twin)):
        out = work / f"{slide.stem}-{tag}.tif"
        segment_slide(slide, out, model=model, options=SegmentOptions(device="cpu"),
                      analysis=None, overwrite=True)
        maps.append(read_level(out))
    share, n = agreement(*maps)
    return {"agreement": share, "pixels": n, "fails": _agreement_fails(share, limits)}


def run_gate(reference: str | Path, twin: str | Path, *, data: Path | None = DATA,
             slides: dict[str, Path] | None = None, limit: int = 0,
             limits: GateLimits = GateLimits()) -> dict:
    """Judge ``twin`` against ``reference`` on the EBHI-Seg val and Kather 2016 mosaics of
    ``data`` (the shared data folder; None: skip them) and on ``slides`` (name -> path).
    ``limit``: at most this many EBHI-Seg val crops (0 = all)."""
    if data is not None:
        for need in (data / "ebhi-seg" / "index.csv", data / "kather-samples" / "labelled-2016"):
            if not need.exists():
                raise FileNotFoundError(f"gate data {need} not found; pass --data with the "
                                        "shared data folder")
    ref_model, twin_model = load_model(reference, device="cpu"), load_model(twin, device="cpu")
    if ref_model.contract.class_names != twin_model.contract.class_names:
        raise ValueError(f"{Path(twin).name} has other classes than {Path(reference).name}")
    out: dict = {"reference": Path(reference).name, "twin": Path(twin).name,
                 "precision": twin_model.contract.precision, "limits": limits.__dict__,
                 "slides": {}}
    with tempfile.TemporaryDirectory(prefix="wsiseg-gate-") as tmp:
        work = Path(tmp)
        if data is not None:
            crops = load_crops(data / "ebhi-seg" / "index.csv", limit=limit)
            out["slides"]["ebhi-val"] = ebhi_check(ref_model, twin_model, crops, work, limits)
            out["slides"]["kather-2016"] = kather_gate(
                ref_model, twin_model, data / "kather-samples" / "labelled-2016", work, limits)
        for name, slide in (slides or {}).items():
            out["slides"][name] = slide_check(ref_model, twin_model, Path(slide), work, limits)
    out["passed"] = not any(r["fails"] for r in out["slides"].values())
    return out


def summary_lines(gate: dict) -> list[str]:
    lines = [f"{gate['twin']} ({gate['precision']}) vs {gate['reference']}: "
             + ("PASSED" if gate["passed"] else "FAILED")]
    for name, r in gate["slides"].items():
        line = f"  {name}: agreement {r['agreement']:.4f}"
        if "dice" in r:
            line += "; Dice fp32 -> twin: " + ", ".join(
                f"{k} {d['fp32']:.3f} -> {d['twin']:.3f}" for k, d in r["dice"].items())
        if "tiles" in r:
            line += f"; tile calls unchanged {r['calls_unchanged']} / {r['tiles']}"
        lines.append(line)
        lines += [f"    fails: {f}" for f in r["fails"]]
    return lines


class GateError(RuntimeError):
    """The twin failed its accuracy gate (and was removed)."""


def make_int8_twin(model: str | Path, cfg, out: str | Path | None = None, *,
                   n_images: int = 64, method: str = "minmax", exclude: tuple[str, ...] = (),
                   full_res_fp32: bool = True, gate: bool = True, data: Path = DATA,
                   limit: int = 0) -> dict:
    """Quantise ``model`` (``wsiseg_train.quantize``) and gate the twin (``run_gate``).
    The gate's result is written beside the twin (``X.int8.gate.json``); a twin that fails it
    is removed (GateError)."""
    import json

    from wsiseg.contract import twin_path

    from .quantize import full_resolution_convs, head_node, quantize_int8

    out = Path(out) if out else twin_path(model, "int8")
    kept = full_resolution_convs(model) if full_res_fp32 else [head_node(model)]
    fp32_nodes = tuple(dict.fromkeys([*kept, *exclude]))
    if not gate:
        return quantize_int8(model, cfg, out, n_images=n_images, exclude=fp32_nodes,
                             method=method)
    # Quantised beside the output under a temporary name, gated, then moved into place: a
    # twin that fails (or a crash) never sits at ``out``.
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        result = quantize_int8(model, cfg, staged, n_images=n_images, exclude=fp32_nodes,
                               method=method)
        result["path"] = str(out)
        result["gate"] = run_gate(model, staged, data=data, limit=limit)
        result["gate"]["twin"] = out.name
        report = out.with_name(out.name.removesuffix(".onnx") + ".gate.json")
        write_text_atomic(report, json.dumps(result, indent=2) + "\n")
        if not result["gate"]["passed"]:
            fails = [f for r in result["gate"]["slides"].values() for f in r["fails"]][:4]
            raise GateError(f"{out.name} failed the accuracy gate ({'; '.join(fails)}) and was "
                            f"not written; see {report}; keep more nodes in fp32 with "
                            "--exclude NODE")
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return result
