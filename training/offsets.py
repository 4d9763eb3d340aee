"""Per-class logit offsets (``wsiseg-train calibrate-offsets``): a prior correction fitted on
labelled crops and written into the model's last convolution bias.

A network trained with class-balanced losses and class-first sampling sees every class about as
often as every other; its logits then carry the training sampler's class prior, not the one of
real tissue. Adding a constant ``b_k`` to class ``k``'s logit everywhere moves only the lines
between classes, never their shape, so it can be fitted on a handful of figures:

- the model runs through the engine on the pairs of a config's split (the training split by
  default: the validation split stays a fair check), and the logits of every ``stride``-th
  labelled pixel are kept;
- coordinate ascent over a grid of offsets maximises the mean per-class Dice of those pixels;
  classes named ``fixed`` keep offset 0. By default these are the contract's tumour and stroma
  classes: the tumour-stroma line is the network's own, since fitting it would write the
  calibration set's tumour : stroma ratio into every slide's tumour-stroma ratio;
- the offsets are added to the bias of the convolution that produces the graph's output (the
  contract, graph and everything else stay as they are; ``training.class_offsets`` records the
  offsets, summed over repeated calibrations) and the result is checked through the engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import Item
from .evaluate import pad_to_multiple
from .metrics import dice_counts, dice_scores
from .onnx_meta import save_with_metadata

GRID = tuple(np.round(np.arange(-3.0, 3.0001, 0.25), 2))
ROUNDS = 3


def collect_logits(model: Any, items: Sequence[Item], class_names: Sequence[str],
                   stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [P, C] float32, labels [P])``: every ``stride``-th labelled pixel of ``items``
    through the engine ``model`` (:func:`wsiseg.engine.load_model`, host head); labels are the
    model's class values 1..C (0 where the reference's class is not one of the model's: those
    pixels are dropped)."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    c = model.contract
    # reference label value -> model class value (0 = a class the model does not have)
    to_model = np.zeros(len(class_names) + 1, np.uint8)
    for i, name in enumerate(class_names):
        if name in c.class_names:
            to_model[i + 1] = c.class_names.index(name) + 1
    scores, labels = [], []
    for it in items:
        h, w = it.labels.shape
        out = model.run(pad_to_multiple(it.image, c.size_multiple)[None])[0, :, :h, :w]
        if c.output == "probabilities":
            out = np.log(np.clip(out, 1e-12, None))
        lab = to_model[it.labels.ravel()]
        keep = np.flatnonzero(lab)[::stride]
        scores.append(out.reshape(out.shape[0], -1)[:, keep].T.astype(np.float32))
        labels.append(lab[keep])
    if not scores or not sum(len(y) for y in labels):
        raise ValueError("no labelled pixel of the model's classes to calibrate on; check the "
                         "config's sets and --split")
    return np.concatenate(scores), np.concatenate(labels)


def mean_dice(logits: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> tuple[float,
                                                                                    np.ndarray]:
    """Mean Dice over the classes present in ``labels`` (values 1..C) and the per-class Dice
    of ``argmax(logits + offsets)`` (:mod:`.metrics`: NaN where a class is in neither)."""
    pred = (logits + offsets).argmax(axis=1) + 1
    per, overall = dice_scores(dice_counts(pred, labels, logits.shape[1]))
    return overall, np.array(per)


def fit_offsets(logits: np.ndarray, labels: np.ndarray, movable: Sequence[int],
                grid: Sequence[float] = GRID, rounds: int = ROUNDS) -> np.ndarray:
    """Offsets ``[C]`` (0 for classes not in ``movable``, channel indices) that maximise
    :func:`mean_dice` by coordinate ascent over ``grid``; a change must gain to be taken, so
    the result is 0 where nothing helps."""
    offsets = np.zeros(logits.shape[1], np.float32)
    best, _ = mean_dice(logits, labels, offsets)
    for _ in range(rounds):
        moved = False
        for k in movable:
            for v in grid:
                trial = offsets.copy()
                trial[k] = v
                score, _ = mean_dice(logits, labels, trial)
                if score > best + 1e-6:
                    best, offsets, moved = score, trial, True
        if not moved:
            break
    return offsets


def _output_bias(graph) -> Any:
    """The bias initializer of the convolution that writes the graph's (only) output."""
    out = graph.output[0].name
    producer = next((n for n in graph.node if out in n.output), None)
    if producer is None or producer.op_type not in ("Conv", "ConvTranspose") \
            or len(producer.input) < 3:
        raise ValueError("offsets need a model whose output is written by a convolution with a "
                         f"bias (here: {producer.op_type if producer else 'no node'})")
    name = producer.input[2]
    users = sum(name in n.input for n in graph.node)
    init = next((t for t in graph.initializer if t.name == name), None)
    if init is None or users != 1:
        raise ValueError(f"the output convolution's bias {name!r} is not a constant of its own")
    return init


def apply_offsets(model_path: str | Path, offsets: Sequence[float], out: str | Path,
                  note: dict[str, Any] | None = None, version: str | None = None) -> Path:
    """Write ``model_path`` with ``offsets`` added to its output bias to ``out`` (atomically),
    record them in ``training.class_offsets`` (and ``version`` as the model's version, if
    given) and check the result through the engine."""
    import onnx
    from onnx import numpy_helper

    from wsiseg.contract import PREFIX, from_metadata
    from wsiseg.engine import load_model

    proto = onnx.load(str(model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    contract = from_metadata(props)
    if contract.precision != "fp32":
        raise ValueError(f"{model_path} is a {contract.precision} twin; calibrate the fp32 model "
                         "and make its twins again")
    offsets = np.asarray(offsets, np.float32)
    if offsets.shape != (len(contract.class_names),):
        raise ValueError(f"need {len(contract.class_names)} offsets, got {offsets.shape}")
    if contract.output != "logits":
        raise ValueError("offsets are added to logits; this model's output is "
                         f"{contract.output}")
    init = _output_bias(proto.graph)
    bias = numpy_helper.to_array(init).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(bias + offsets, init.name))
    training = json.loads(props.get(PREFIX + "training", "{}") or "{}")
    before = training.get("class_offsets", {}).get("offsets", {})
    total = {n: round(float(before.get(n, 0.0)) + float(o), 4)
             for n, o in zip(contract.class_names, offsets)}
    training["class_offsets"] = {"offsets": total, **(note or {})}
    props[PREFIX + "training"] = json.dumps(training)
    if version is not None:
        if not version.strip():
            raise ValueError("the model version must not be empty")
        props[PREFIX + "version"] = version
    out = Path(out)
    save_with_metadata(proto, props, out)
    _check(load_model(model_path, device="cpu", head="host"),
           load_model(out, device="cpu", head="host"), offsets)
    return out


def _check(old, new, offsets: np.ndarray) -> None:
    m = old.contract.size_multiple
    side = max(2 * m, 64 // m * m)
    x = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    diff = new.run(x) - old.run(x) - offsets[None, :, None, None]
    if float(np.abs(diff).max()) > 1e-3:
        raise ValueError("the calibrated model does not equal the old one plus the offsets "
                         f"(max deviation {float(np.abs(diff).max()):.2g})")


def calibrate_offsets(model_path: str | Path, items: Sequence[Item],
                      class_names: Sequence[str], out: str | Path, *,
                      fixed: Sequence[str] | None = None, stride: int = 4,
                      split: str = "train", version: str | None = None) -> dict[str, Any]:
    """Fit offsets on ``items`` (labels named by ``class_names``), write the calibrated model to
    ``out`` and return what was done: offsets by class name and Dice before / after."""
    from wsiseg.engine import load_model

    model = load_model(model_path, device="cpu", head="host")
    contract = model.contract
    names = list(contract.class_names)
    if fixed is None:
        fixed = [*contract.tumour_classes, *contract.stroma_classes]
    unknown = [n for n in fixed if n not in names]
    if unknown:
        raise ValueError(f"--fixed {', '.join(unknown)}: not a class of the model "
                         f"({', '.join(names)})")
    logits, labels = collect_logits(model, items, class_names, stride)
    movable = [k for k, n in enumerate(names) if n not in fixed]
    offsets = fit_offsets(logits, labels, movable)
    before, dice_before = mean_dice(logits, labels, np.zeros_like(offsets))
    after, dice_after = mean_dice(logits, labels, offsets)
    note = {"split": split, "images": len(items), "pixels": int(len(labels)),
            "fixed": list(fixed)}
    apply_offsets(model_path, offsets, out, note, version)

    def by_name(v: np.ndarray) -> dict[str, float | None]:
        return {n: (None if np.isnan(d) else round(float(d), 4)) for n, d in zip(names, v)}

    return {"model": str(out), "offsets": {n: float(o) for n, o in zip(names, offsets)},
            **note, "dice_before": by_name(dice_before), "dice_after": by_name(dice_after),
            "mean_dice_before": round(before, 4), "mean_dice_after": round(after, 4)}
