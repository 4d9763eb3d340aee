"""``wsiseg-train``: train, export and evaluate the U-Net.

Exit codes: 0 success, 1 the run or the model failed (training, export, evaluation), 2 bad
input (config, checkpoint, data files). Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .annotations import AnnotationError
from .config import ConfigError, load_config


def _fail(message: str, code: int) -> None:
    click.echo(f"wsiseg-train: error: {message}", err=True)
    sys.exit(code)


def _run(fn, *args, **kwargs):
    """Call fn, turning the errors a user can fix into one-line messages."""
    from wsiseg.context import ContextError
    from wsiseg.contract import ContractError

    from .checkpoint import CheckpointError
    from .export import ExportError
    from .quantgate import GateError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, CheckpointError, AnnotationError, ContractError,
            FileNotFoundError) as e:
        _fail(str(e), 2)
    except (ExportError, ContextError, GateError) as e:
        _fail(str(e), 1)
    except (ValueError, OSError) as e:
        _fail(str(e), 2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train wsiseg's U-Net on sparse and dense annotations and export it to ONNX."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:  # the inference install has no torch
        _fail("wsiseg-train needs the training extra: pip install 'wsiseg[train]'", 2)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--run-dir", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: runs/<config name> beside the config).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from last.pt.")
def train(config: Path, run_dir: Path | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Train from CONFIG (TOML); writes checkpoints, metrics, a plot and model.onnx."""
    from .train import train as run_training

    cfg = _run(load_config, config, list(overrides))
    run_dir = run_dir or config.resolve().parent / "runs" / config.stem
    state = _run(run_training, cfg, run_dir, resume=resume)
    click.echo(json.dumps({"run_dir": str(run_dir), "epochs": state["epoch"],
                           "best_epoch": state["best_epoch"], "best_val_dice": state["best_dice"]}))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="ONNX file to write.")
@click.option("--no-context", is_flag=True,
              help="Keep the config's model.border_px instead of measuring the context.")
@click.option("--int8", "int8", is_flag=True,
              help="Also write the gated int8 twin (X.int8.onnx), as `quantize` does with the "
                   "run's own config.")
def export(run: Path, output: Path, no_context: bool, int8: bool) -> None:
    """Export RUN (a run folder, whose best.pt is used, or a .pt checkpoint) to ONNX.

    The border the engine discards is set from the model's measured effective context (see
    ``wsiseg-train context``) unless --no-context is given."""
    from .export import export_onnx

    report = _run(export_onnx, run, output, context=not no_context)
    border = report["contract"]["border_px"]
    click.echo(f"wrote {report['path']}: opset {report['opset']}, ONNX Runtime vs torch max abs "
               f"diff {report['max_abs_diff']:.3g}, border {border}px", err=True)
    click.echo(json.dumps({**{k: report[k] for k in ("path", "opset", "exporter",
                                                     "max_abs_diff")}, "border_px": border}))
    if int8:
        from .checkpoint import load as load_checkpoint
        from .model import model_from_checkpoint
        from .quantgate import make_int8_twin

        cfg, _ = _run(model_from_checkpoint, _run(load_checkpoint, run))
        _report_twin(_run(make_int8_twin, output, cfg))


def _report_twin(result: dict) -> None:
    from .quantgate import summary_lines

    click.echo(f"wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB, fp32 nodes: "
               f"{', '.join(result['fp32_nodes']) or 'none'})", err=True)
    for line in summary_lines(result["gate"]) if "gate" in result else []:
        click.echo(line, err=True)
    click.echo(json.dumps(result))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--apply", "apply_it", is_flag=True,
              help="Write the measured border into MODEL (replaced atomically) or into -o.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="With --apply: write the updated model here instead of replacing MODEL.")
@click.option("--slide", type=click.Path(path_type=Path),
              help="Tissue to measure on (default: examples/ebhi-val-mosaic.tif).")
@click.option("--mpp", type=float, help="The slide's level-0 microns per pixel, if it has none.")
@click.option("--max-px", type=int, default=160, show_default=True,
              help="Context of the reference window; distances below it are tried "
                   "(a multiple of the model's size_multiple).")
@click.option("--samples", type=int, default=12, show_default=True,
              help="Windows on tissue to measure on.")
def context(model: Path, apply_it: bool, output: Path | None, slide: Path | None,
            mpp: float | None, max_px: int, samples: int) -> None:
    """Measure MODEL's effective context: how far input still changes an output pixel.

    Prints the label flips and probability changes per distance on stderr and the result as
    JSON on stdout; with --apply, sets the model's border_px to it (metadata only)."""
    from wsiseg.context import ContextParams

    from .border import apply_context, measure

    if output and not apply_it:
        raise click.UsageError("-o/--output is only used with --apply")
    params = ContextParams(max_px=max_px, samples=samples)
    fn = apply_context if apply_it else measure
    kwargs = {"out": output} if apply_it else {}
    result = _run(fn, model, slide=slide, mpp=mpp, params=params, **kwargs)
    click.echo("distance px   cut flips  cut dp   swap flips  swap dp", err=True)
    for row in result["curve"]:
        click.echo(f"{row['distance_px']:11d}   {row['cut_flips']:9.3%}  {row['cut_prob']:6.4f}"
                   f"   {row['swap_flips']:10.3%}  {row['swap_prob']:7.4f}", err=True)
    click.echo(f"effective context: {result['context_px']} px"
               + (f"; border_px set to {result['border_px']} in {result['path']}"
                  if apply_it else ""), err=True)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "contract"}))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Twin to write (default: MODEL with .int8.onnx, where `wsiseg segment "
                   "--precision int8` looks).")
@click.option("--images", type=click.IntRange(1), default=64, show_default=True,
              help="Train-split images of CONFIG's pair sets to calibrate on.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True, help="Calibration of activation ranges.")
@click.option("--exclude", multiple=True, metavar="NODE",
              help="Also keep this node in fp32 (repeatable).")
@click.option("--full-res-fp32/--full-res-int8", default=True, show_default=True,
              help="Keep the convolutions at full resolution (first and last U-Net level and "
                   "the logits head) in fp32; the head stays fp32 either way.")
@click.option("--no-gate", is_flag=True, help="Skip the accuracy gate against MODEL.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Shared data folder with ebhi-seg/ and kather-samples/ for the gate "
                   "(default: ../shared/data beside the checkout).")
@click.option("--limit", type=click.IntRange(0), default=0, show_default=True,
              help="Gate on at most this many EBHI-Seg val crops (0 = all).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def quantize(model: Path, config: Path, output: Path | None, images: int, method: str,
             exclude: tuple[str, ...], full_res_fp32: bool, no_gate: bool, data: Path | None,
             limit: int, overrides: tuple[str, ...]) -> None:
    """Static int8 twin of the ONNX MODEL, calibrated on CONFIG's training images, then gated:
    on EBHI-Seg val and the labelled Kather 2016 tiles, through the engine: label agreement
    >= 99 %, Dice against the labels at most 0.01 below MODEL's, no tile call changed."""
    from .quantgate import DATA, make_int8_twin

    cfg = _run(load_config, config, list(overrides))
    _report_twin(_run(make_int8_twin, model, cfg, output, n_images=images, method=method,
                      exclude=exclude, full_res_fp32=full_res_fp32, gate=not no_gate,
                      data=data or DATA, limit=limit))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Twin to write (default: MODEL with .fp16.onnx).")
def fp16(model: Path, output: Path | None) -> None:
    """Float16 twin of the ONNX MODEL for CUDA and TensorRT (gate it on a GPU:
    benchmarks/gpu_check.sh)."""
    from wsiseg.contract import twin_path

    from .quantize import convert_fp16

    result = _run(convert_fp16, model, output or twin_path(model, "fp16"))
    click.echo(json.dumps(result))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folded model to write (may be MODEL itself).")
def fold(model: Path, output: Path) -> None:
    """Store MODEL's decoder upsampling + 3x3 convolutions as transposed convolutions: the same
    logits (checked through the engine), about 1.4x faster on the CPU. Exports are folded
    already; this is for models exported before."""
    from .export import fold_model

    click.echo(json.dumps(_run(fold_model, model, output)))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--split", default="val", show_default=True,
              help="Which rows of the config's pair sets to score (train or val).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def evaluate(model: Path, config: Path, split: str, overrides: tuple[str, ...]) -> None:
    """Per-class Dice of the ONNX MODEL on the reference pairs of CONFIG's sets."""
    from .evaluate import evaluate_onnx, summary_lines
    from .sets import load_set

    if not model.is_file():
        _fail(f"model {model} not found", 2)
    cfg = _run(load_config, config, list(overrides))
    items = [it for s in cfg.data.sets if s.kind == "pairs"
             for it in _run(load_set, s, cfg, split)]
    result = _run(evaluate_onnx, model, items, list(cfg.model.classes))
    for line in summary_lines(result):
        click.echo(line, err=True)
    click.echo(json.dumps(result))


@main.command()
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--split", default="val", show_default=True,
              help="Which rows of the config's pair sets to score (train or val).")
@click.option("--resamples", type=click.IntRange(1), default=2000, show_default=True,
              help="Bootstrap draws of the images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def compare(model_a: Path, model_b: Path, config: Path, split: str, resamples: int, seed: int,
            overrides: tuple[str, ...]) -> None:
    """Dice of ONNX MODEL_A and MODEL_B on the same reference pairs of CONFIG, and how sure
    each difference is: B - A with a 95 % interval from a paired bootstrap over the images (a
    difference whose interval holds 0 is within what the choice of images can change)."""
    from .evaluate import compare_lines, compare_onnx
    from .sets import load_set

    for m in (model_a, model_b):
        if not m.is_file():
            _fail(f"model {m} not found", 2)
    cfg = _run(load_config, config, list(overrides))
    items = [it for s in cfg.data.sets if s.kind == "pairs"
             for it in _run(load_set, s, cfg, split)]
    result = _run(compare_onnx, model_a, model_b, items, list(cfg.model.classes), resamples,
                  seed)
    for line in compare_lines(result):
        click.echo(line, err=True)
    click.echo(json.dumps(result))


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the runs and results.json (an existing one is continued).")
@click.option("--table", type=click.Path(path_type=Path), default=None,
              help="Markdown table to write (default: OUT/table.md).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG plot to write (default: OUT/plot.png).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key, e.g. --set experiment.seeds=[0] (repeatable).")
def experiment(config: Path, out: Path, table: Path | None, plot_path: Path | None,
               overrides: tuple[str, ...]) -> None:
    """The paper's Table 2 in miniature (training/experiment.py): annotation x weighting."""
    from .experiment import load_experiment, run_experiment, write_report

    cfg, exp = _run(load_experiment, config, list(overrides))
    results = _run(run_experiment, cfg, exp, out)
    click.echo(_run(write_report, results, cfg, exp, table or out / "table.md",
                    plot_path or out / "plot.png"))


@main.command("evaluate-ood")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=Path("../shared/data"),
              show_default=True, help="Folder holding ebhi-seg/ and kather-samples/.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Markdown table to write (the JSON results go beside it as .json).")
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evenly spaced val crops per EBHI set (0 = all); for quick checks.")
@click.option("--kather-mpp", type=click.FloatRange(min=0.05, max=16.0), default=0.495,
              show_default=True,
              help="Spacing (µm/px) the Kather mosaic slide declares: the tiles' own, or "
                   "another to see how the calls change under a scanner's or a wrong scale.")
def evaluate_ood(models: tuple[Path, ...], data: Path, out: Path | None, limit: int,
                 kather_mpp: float) -> None:
    """Out-of-distribution check of one or more ONNX MODELS through the engine: Kather 2016
    tiles of another lab, EBHI-Seg val and lesion val, context-free windows (training/ood.py).
    Prints a Markdown table with a column per model."""
    from .ood import evaluate_ood as run_ood
    from .ood import markdown

    results = [_run(run_ood, m, data, limit=limit, kather_mpp=kather_mpp,
                    progress=lambda s, m=m: click.echo(f"{m.name}: {s}", err=True))
               for m in models]
    table = markdown(results)
    if out is not None:
        _run(_write_text, out, table)
        _run(_write_text, out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    click.echo(table)


def _write_text(path: Path, text: str) -> None:
    from wsiseg.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


@main.command("calibrate-qc")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the calibrated model here (default: update MODEL in place).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def calibrate_qc(model: Path, config: Path, output: Path | None,
                 overrides: tuple[str, ...]) -> None:
    """Store quality-control figures in MODEL's contract: the stain reference of CONFIG's
    training pairs and confidence thresholds on its validation pairs (training/calibrate.py)."""
    from .calibrate import calibrate, write_qc
    from .sets import load_set

    if not model.is_file():
        _fail(f"model {model} not found", 2)
    cfg = _run(load_config, config, list(overrides))
    pairs = [s for s in cfg.data.sets if s.kind == "pairs"]
    train = [it for s in pairs for it in _run(load_set, s, cfg, "train")]
    val = [it for s in pairs for it in _run(load_set, s, cfg, "val")]
    qc = _run(calibrate, model, train, val)
    path = _run(write_qc, model, qc, output)
    click.echo(f"wrote {path}", err=True)
    click.echo(json.dumps(qc))


@main.command("calibrate-offsets")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Calibrated model to write (may be MODEL itself).")
@click.option("--split", default="train", show_default=True,
              help="Which rows of the config's pair sets to fit on (keep val for checking).")
@click.option("--fixed", multiple=True, metavar="CLASS",
              help="A class whose logit keeps offset 0 (repeatable; default: the contract's "
                   "tumour and stroma classes, so the tumour-stroma line stays the network's).")
@click.option("--stride", type=click.IntRange(1), default=4, show_default=True,
              help="Use every n-th labelled pixel.")
@click.option("--version", "version", default=None,
              help="Model version to write into the contract (default: unchanged).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def calibrate_offsets(model: Path, config: Path, output: Path, split: str,
                      fixed: tuple[str, ...], stride: int, version: str | None,
                      overrides: tuple[str, ...]) -> None:
    """Fit per-class logit offsets of the ONNX MODEL on CONFIG's labelled pairs (maximum mean
    Dice) and write them into its output bias (training/offsets.py). Run calibrate-qc and
    make the int8 twin again afterwards: both depend on the logits."""
    from .offsets import calibrate_offsets as fit
    from .sets import load_set

    if not model.is_file():
        _fail(f"model {model} not found", 2)
    cfg = _run(load_config, config, list(overrides))
    items = [it for s in cfg.data.sets if s.kind == "pairs"
             for it in _run(load_set, s, cfg, split)]
    result = _run(fit, model, items, list(cfg.model.classes), output,
                  fixed=list(fixed) or None, stride=stride, split=split, version=version)
    click.echo(f"wrote {output}: mean Dice on {split} {result['mean_dice_before']:.3f} -> "
               f"{result['mean_dice_after']:.3f}", err=True)
    click.echo(json.dumps(result))
