"""The paper's Table 2 in miniature: sparse, dense and combined annotation × three loss weightings.

Bokhorst et al. 2019 trained U-Nets on sparse annotations, dense annotations and both mixed 4:1,
each with no balancing, instance-based balancing (eq. 1) and mini-batch-based balancing (eq. 2),
and reported per-class Dice on densely annotated test regions. :func:`run_experiment` repeats
that grid on EBHI-Seg with the labels of :mod:`training.ebhi`:

- the training patients are split (by patient, with a fixed generator) into a **sparse part**
  and a smaller **dense part** (``dense_fraction``; the paper had 54 sparsely and 16 densely
  annotated images); the sparse part's labels are sparsified, the dense part's kept whole;
- **sparse** trains on the sparse part, **dense** on the dense part, **combined** on both with
  patches drawn 4:1 sparse:dense (``data.sparse_dense_ratio``);
- every setting is trained with each weighting and each seed by the ordinary training loop
  (:func:`training.train.train`), and its best checkpoint (by validation Dice on patches) is
  exported and scored through the engine (:func:`training.evaluate.evaluate_onnx`) on the whole
  validation crops with dense derived labels: per-class Dice and overall Dice (mean over the
  classes present).

The config is a training config plus an ``[experiment]`` table (see
``training/configs/experiment.toml``). Results go to ``<out>/results.json`` (one record per
run, reused when the experiment is run again), ``<out>/table.md`` and ``<out>/plot.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import statistics
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, ConfigError, apply_overrides, from_dict

log = logging.getLogger(__name__)

ANNOTATIONS = ("sparse", "dense", "combined")
WEIGHTINGS = ("none", "instance", "minibatch")
WEIGHTING_TITLES = {"none": "none", "instance": "instance", "minibatch": "mini-batch"}


@dataclass(frozen=True)
class ExperimentSection:
    seeds: tuple[int, ...] = (0, 1, 2)
    annotations: tuple[str, ...] = ANNOTATIONS
    weightings: tuple[str, ...] = WEIGHTINGS
    dense_fraction: float = 0.25         # of the training patients, densely annotated
    split_seed: int = 0                  # which patients are dense
    limit: int = 0                       # use only this many training images (0 = all)


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config,
                                                                             ExperimentSection]:
    """A training config (one ``pairs`` set, mapping ``ebhi``) and its ``[experiment]`` table."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    raw = apply_overrides(raw, list(overrides))
    exp_raw = dict(raw.pop("experiment", {}))
    fields = {f.name for f in dataclasses.fields(ExperimentSection)}
    unknown = sorted(set(exp_raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key experiment.{unknown[0]}; valid keys: {', '.join(fields)}")
    for k in ("seeds", "annotations", "weightings"):
        if k in exp_raw:
            exp_raw[k] = tuple(exp_raw[k])
    exp = ExperimentSection(**exp_raw)
    bad = [a for a in exp.annotations if a not in ANNOTATIONS]
    bad += [w for w in exp.weightings if w not in WEIGHTINGS]
    if bad:
        raise ConfigError(f"experiment: {bad[0]!r} is not one of {ANNOTATIONS + WEIGHTINGS}")
    if not exp.seeds:
        raise ConfigError("experiment.seeds is empty")
    if not 0 < exp.dense_fraction < 1:
        raise ConfigError(f"experiment.dense_fraction must be in (0, 1), got {exp.dense_fraction}")
    cfg = from_dict(raw, path.resolve().parent)
    if len(cfg.data.sets) != 1 or cfg.data.sets[0].kind != "pairs" or \
            cfg.data.sets[0].mapping != "ebhi":
        raise ConfigError("an experiment config has exactly one [[data.sets]]: kind = \"pairs\", "
                          "mapping = \"ebhi\" (its train rows are split into sparse and dense)")
    return cfg, exp


def split_patients(rows: list[dict[str, str]], fraction: float, seed: int,
                   group_column: str = "patient", stratify_column: str = "class"
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(sparse rows, dense rows): ``fraction`` of the patients of each class go to dense."""
    by_class: dict[str, list[str]] = {}
    for r in rows:
        patients = by_class.setdefault(r.get(stratify_column, ""), [])
        if r[group_column] not in patients:
            patients.append(r[group_column])
    rng = np.random.default_rng(seed)
    dense: set[str] = set()
    for key in sorted(by_class):
        patients = sorted(by_class[key])
        n = max(1, int(round(fraction * len(patients))))
        dense.update(patients[i] for i in rng.permutation(len(patients))[:n])
    return ([r for r in rows if r[group_column] not in dense],
            [r for r in rows if r[group_column] in dense])


def _write_csv(path: Path, rows: list[dict[str, str]], base: Path, s: Any) -> None:
    cols = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, s.image_column: str(base / r[s.image_column]),
                        s.mask_column: str(base / r[s.mask_column])})


def setting_config(cfg: Config, exp: ExperimentSection, annotation: str, weighting: str,
                   seed: int, out: Path) -> Config:
    """The training config of one cell of the grid (writes the index CSVs it needs)."""
    from .data import read_pairs_csv

    s = cfg.data.sets[0]
    rows = read_pairs_csv(s.index, image_column=s.image_column, mask_column=s.mask_column)
    train = [r for r in rows if r.get(s.split_column) == "train"]
    val = [r for r in rows if r.get(s.split_column) == "val"]
    if exp.limit and len(train) > exp.limit:
        train = [train[i] for i in np.linspace(0, len(train) - 1, exp.limit).round().astype(int)]
    sparse_rows, dense_rows = split_patients(train, exp.dense_fraction, exp.split_seed)
    base = Path(s.index).parent
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("sparse", sparse_rows + val), ("dense", dense_rows + val),
                       ("dense-train", dense_rows)):
        if not (out / f"{name}.csv").is_file():
            _write_csv(out / f"{name}.csv", part, base, s)
    sparse_set = dataclasses.replace(s, index=str(out / "sparse.csv"), annotation="sparse",
                                     limit=0)
    dense_set = dataclasses.replace(s, index=str(out / "dense.csv"), annotation="dense", limit=0)
    sets = {"sparse": (sparse_set,), "dense": (dense_set,),
            # validation rows come from the sparse set only (they are dense there too)
            "combined": (sparse_set, dataclasses.replace(dense_set,
                                                          index=str(out / "dense-train.csv")))}
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, sets=sets[annotation]),
        train=dataclasses.replace(cfg.train, weighting=weighting, seed=seed, export=False))


def score(checkpoint: Path, cfg: Config) -> dict[str, Any]:
    """Per-class and overall Dice of a checkpoint on the whole validation crops (dense labels):
    its ONNX export (a temporary file) scored by :func:`.evaluate.evaluate_onnx`, through the
    engine as in inference."""
    from .data import load_pairs
    from .evaluate import evaluate_onnx
    from .export import export_onnx
    from .sets import class_values, pair_mapping

    with tempfile.TemporaryDirectory(prefix="wsiseg-score-") as tmp:
        model = Path(tmp) / "model.onnx"
        export_onnx(checkpoint, model, context=False)
        items = [it for s in cfg.data.sets
                 for it in load_pairs(s.index, pair_mapping(s, class_values(cfg)), split="val",
                                      split_column=s.split_column, image_column=s.image_column,
                                      mask_column=s.mask_column)]
        result = evaluate_onnx(model, items, list(cfg.model.classes))
    return {"dice": result["dice"], "overall": result["overall_dice"], "images": result["images"]}


def run_experiment(cfg: Config, exp: ExperimentSection, out: str | Path) -> list[dict[str, Any]]:
    """Train and score every (annotation, weighting, seed); returns the result records."""
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["annotation"], r["weighting"], r["seed"]) for r in results}
    for seed in exp.seeds:
        for annotation in exp.annotations:
            for weighting in exp.weightings:
                if (annotation, weighting, seed) in done:
                    continue
                run_cfg = setting_config(cfg, exp, annotation, weighting, seed, out / "index")
                run_dir = out / f"{annotation}-{weighting}-s{seed}"
                t0 = time.perf_counter()
                state = train(run_cfg, run_dir, resume=(run_dir / "last.pt").is_file())
                result = score(run_dir / "best.pt", run_cfg)
                results.append({"annotation": annotation, "weighting": weighting, "seed": seed,
                                 "best_epoch": state["best_epoch"],
                                 "seconds": round(time.perf_counter() - t0, 1), **result})
                results_path.write_text(json.dumps(results, indent=1))
                log.info("%s / %s / seed %d: overall Dice %.3f", annotation, weighting, seed,
                         result["overall"])
    return results


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def summarise(results: list[dict[str, Any]], classes: Sequence[str]
              ) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(annotation, weighting) -> row name -> (mean, standard deviation, number of seeds)."""
    cells: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for a in ANNOTATIONS:
        for w in WEIGHTINGS:
            rs = [r for r in results if r["annotation"] == a and r["weighting"] == w]
            if rs:
                cells[a, w] = {c: _stats([r["dice"].get(c) for r in rs]) for c in classes}
                cells[a, w]["overall"] = _stats([r["overall"] for r in rs])
    return cells


def markdown_table(results: list[dict[str, Any]], cfg: Config, exp: ExperimentSection) -> str:
    classes = list(cfg.model.classes)
    cells = summarise(results, classes)
    keys = list(cells)
    seeds = sorted({r["seed"] for r in results})
    m, t = cfg.model, cfg.train
    minutes = sum(r["seconds"] for r in results) / 60
    head = (f"Dice on the EBHI-Seg val split ({results[0]['images']} whole 224 px crops, dense "
            f"derived labels), mean ± standard deviation over seeds {seeds}. "
            f"Miniature of Bokhorst et al. 2019, Table 2: U-Net width {m.width}, depth {m.depth}, "
            f"norm {m.norm} (paper: 32, 5, none); {cfg.data.patch_px} px patches (paper: 384); "
            f"{t.epochs} × {t.iterations} iterations of batch {t.batch_size} at lr {t.lr:g} "
            f"(paper: up to 300 × 750 at 1e-5); dense part = {exp.dense_fraction:.0%} of the "
            f"training patients. {len(results)} runs, {minutes:.0f} min of run time in all "
            "(summed over runs) on 2 shared CPU cores.")
    lines = [head, "",
             "| class | " + " | ".join(f"{a} / {WEIGHTING_TITLES[w]}" for a, w in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for row in [*classes, "overall"]:
        vals = []
        for k in keys:
            mean, sd, n = cells[k][row]
            vals.append("–" if not n else f"{mean:.2f} ± {sd:.2f}")
        name = f"**{row}**" if row == "overall" else row
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], cfg: Config, path: str | Path) -> None:
    """Overall Dice per setting (bars = mean, whiskers = ± sd, dots = seeds), Pillow only."""
    from PIL import Image, ImageDraw

    cells = summarise(results, list(cfg.model.classes))
    W, H, x0, y0, y1 = 900, 420, 60, 40, 340
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((x0, 10), "Overall Dice on EBHI-Seg val (mean ± sd over seeds; dots = seeds)",
           fill=(0, 0, 0))
    d.line((x0, y0, x0, y1), fill=(0, 0, 0))
    d.line((x0, y1, W - 20, y1), fill=(0, 0, 0))
    y = lambda v: y1 - (y1 - y0) * v  # noqa: E731  (Dice 0..1)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0 - 4, y(v), W - 20, y(v)), fill=(225, 225, 225))
        d.text((x0 - 32, y(v) - 6), f"{v:.2f}", fill=(0, 0, 0))
    colours = {"none": (150, 150, 150), "instance": (31, 119, 180), "minibatch": (214, 39, 40)}
    group_w = (W - 20 - x0) / len(ANNOTATIONS)
    bar_w = group_w / 4
    for gi, a in enumerate(ANNOTATIONS):
        gx = x0 + gi * group_w
        d.text((gx + group_w / 2 - 25, y1 + 24), a, fill=(0, 0, 0))
        for wi, w in enumerate(WEIGHTINGS):
            if (a, w) not in cells:
                continue
            mean, sd, _ = cells[a, w]["overall"]
            bx = gx + bar_w * (wi + 0.5)
            if math.isfinite(mean):
                d.rectangle((bx, y(mean), bx + bar_w * 0.8, y1), fill=colours[w])
                cx = bx + bar_w * 0.4
                d.line((cx, y(mean - sd), cx, y(mean + sd)), fill=(0, 0, 0), width=2)
            for r in results:
                if r["annotation"] == a and r["weighting"] == w and math.isfinite(r["overall"]):
                    cx = bx + bar_w * 0.4
                    d.ellipse((cx - 3, y(r["overall"]) - 3, cx + 3, y(r["overall"]) + 3),
                              outline=(0, 0, 0), fill=(255, 255, 255))
            d.text((bx, y1 + 6), WEIGHTING_TITLES[w], fill=(0, 0, 0))
    for wi, w in enumerate(WEIGHTINGS):
        lx = W - 160
        d.rectangle((lx, 40 + 18 * wi, lx + 12, 52 + 18 * wi), fill=colours[w])
        d.text((lx + 18, 40 + 18 * wi), WEIGHTING_TITLES[w], fill=(0, 0, 0))
    img.save(path)


def orderings(results: list[dict[str, Any]], classes: Sequence[str]) -> list[str]:
    """The paper's claims, checked on the mean overall Dice."""
    cells = summarise(results, classes)
    o = {k: v["overall"][0] for k, v in cells.items()}
    lines = []
    if all(("sparse", w) in o for w in WEIGHTINGS):
        s = [o["sparse", w] for w in ("minibatch", "instance", "none")]
        held = s[0] > s[1] > s[2]
        verdict = "holds" if held else "does not hold"
        lines.append(f"sparse: mini-batch {s[0]:.3f}, instance {s[1]:.3f}, none {s[2]:.3f} — "
                     f"paper's order mini-batch > instance > none {verdict}")
    if ("combined", "instance") in o and any(("dense", w) in o for w in WEIGHTINGS):
        best_dense = max(o[k] for k in o if k[0] == "dense")
        c = o["combined", "instance"]
        lines.append(f"combined + instance {c:.3f} vs best dense {best_dense:.3f} "
                     f"(difference {c - best_dense:+.3f})")
    return lines


def write_report(results: list[dict[str, Any]], cfg: Config, exp: ExperimentSection,
                 table: str | Path, plot_path: str | Path) -> str:
    text = markdown_table(results, cfg, exp)
    text += "\n" + "\n".join(f"- {line}" for line in orderings(results, cfg.model.classes)) + "\n"
    Path(table).parent.mkdir(parents=True, exist_ok=True)
    Path(table).write_text(text)
    plot(results, cfg, plot_path)
    return text
