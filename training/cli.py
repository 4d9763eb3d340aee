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
    from wsiseg.contract import ContractError

    from .export import ExportError
    from .quantgate import GateError
    from .train import CheckpointError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, CheckpointError, AnnotationError, ContractError,
            FileNotFoundError) as e:
        _fail(str(e), 2)
    except (ExportError, GateError) as e:
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
@click.option("--int8", "int8", is_flag=True,
              help="Also write the gated int8 twin (X.int8.onnx), as `quantize` does with the "
                   "run's own config.")
def export(run: Path, output: Path, int8: bool) -> None:
    """Export RUN (a run folder, whose best.pt is used, or a .pt checkpoint) to ONNX."""
    from .export import export_onnx

    report = _run(export_onnx, run, output)
    click.echo(f"wrote {report['path']}: opset {report['opset']}, ONNX Runtime vs torch max abs "
               f"diff {report['max_abs_diff']:.3g}", err=True)
    click.echo(json.dumps({k: report[k] for k in ("path", "opset", "exporter", "max_abs_diff")}))
    if int8:
        from .quantgate import make_int8_twin
        from .train import load_checkpoint, model_from_checkpoint

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
@click.option("--demo", type=click.Path(path_type=Path), default=None,
              help="Gate slide 1 (default: examples/ebhi-val-mosaic.tif).")
@click.option("--kather", type=click.Path(path_type=Path), default=None,
              help="Folder of labelled Kather 2016 tiles for gate slide 2.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable).")
def quantize(model: Path, config: Path, output: Path | None, images: int, method: str,
             exclude: tuple[str, ...], full_res_fp32: bool, no_gate: bool, demo: Path | None,
             kather: Path | None,
             overrides: tuple[str, ...]) -> None:
    """Static int8 twin of the ONNX MODEL, calibrated on CONFIG's training images, then gated:
    its labels must match MODEL's (per-class Dice >= 0.99, agreement >= 99 %) on two slides."""
    from .quantgate import DEMO_SLIDE, KATHER_DIR, make_int8_twin

    cfg = _run(load_config, config, list(overrides))
    _report_twin(_run(make_int8_twin, model, cfg, output, n_images=images, method=method,
                      exclude=exclude, full_res_fp32=full_res_fp32, gate=not no_gate,
                      demo=demo or DEMO_SLIDE,
                      kather=kather or KATHER_DIR))


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
