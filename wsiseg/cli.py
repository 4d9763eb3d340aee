"""Command line: the only module that knows click, exit codes and the terminal.

Exit codes: 0 success, 1 failure (bad slide, model, output, ...), 2 usage error, 130 interrupted.
Progress and messages go to stderr; machine-readable results (``info --json``) to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import click

from . import __version__

log = logging.getLogger("wsiseg")

DEFAULT_MODEL_ENV = "WSISEG_MODEL"
DEFAULT_MODEL_FILE = "wsiseg-ebhi-unet.onnx"


def default_model() -> Path:
    """``$WSISEG_MODEL``, else the model shipped inside the package."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    shipped = Path(str(resources.files("wsiseg.models").joinpath(DEFAULT_MODEL_FILE)))
    if not shipped.is_file():
        raise click.UsageError(f"no default model is installed; pass --model MODEL.onnx "
                               f"or set {DEFAULT_MODEL_ENV}")
    return shipped


def _user_errors() -> tuple[type[BaseException], ...]:
    from .contract import ContractError
    from .engine import ModelError
    from .pipeline import OutputError
    from .slide import SlideError
    return (SlideError, ModelError, ContractError, OutputError, FileNotFoundError,
            PermissionError, IsADirectoryError)


class _Group(click.Group):
    """Turns the project's own errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"wsiseg: error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("wsiseg: interrupted; no output was left at the final path", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Segment H&E whole-slide images into tissue classes and measure the tumour-stroma ratio."""
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="wsiseg: %(levelname)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"quiet": quiet}


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Level-0 microns per pixel, overriding the slide's.")
@click.option("--model", type=click.Path(path_type=Path), help="Model whose read plan to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def info(slide: Path, mpp: float | None, model: Path | None, as_json: bool) -> None:
    """Show a slide's format, levels, pixel size, and what segment would read."""
    from .slide import Slide
    target_mpp = 1.0
    if model is not None:
        from .engine import load_model
        target_mpp = load_model(model, device="cpu").contract.mpp
    with Slide(slide, mpp=mpp) as s:
        plan = s.plan(target_mpp)
        data = {"slide": s.info.to_dict(), "model_mpp": target_mpp, "read_plan": plan.to_dict()}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    i = data["slide"]
    click.echo(f"{slide}\n  vendor      {i['vendor']}\n  size        {i['width_px']} x "
               f"{i['height_px']} px\n  mpp         {i['mpp']:.4g} um/px ({i['mpp_source']})")
    for k, (lvl, ds) in enumerate(zip(i["levels"], i["level_downsamples"])):
        click.echo(f"  level {k}     {lvl[0]} x {lvl[1]} px, downsample {ds:.4g}")
    p = data["read_plan"]
    how = (f"resampled by {p['level_px_per_out_px']:.4g}" if p["resampled"] else "as is")
    click.echo(f"  at {target_mpp:g} um/px: level {p['level']} {how} -> "
               f"{p['out_shape'][1]} x {p['out_shape'][0]} px map (mpp {p['mpp']:.4g})")


@main.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Label map TIFF to write.")
@click.option("--model", type=click.Path(path_type=Path),
              help=f"ONNX model with a wsiseg contract (default: ${DEFAULT_MODEL_ENV} or the shipped model).")
@click.option("--mpp", type=float, help="Slide level-0 microns per pixel, overriding the slide's.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="Where to run the model; auto = CUDA if available, else CPU.")
@click.option("--tile-px", type=int, help="Input tile size (default 1024, a multiple of the model's).")
@click.option("--batch-size", type=int, help="Tiles per model call (default 1 on CPU, 4 on GPU).")
@click.option("--workers", type=int, default=2, show_default=True, help="Slide reader threads.")
@click.option("--no-tissue-mask", is_flag=True, help="Run the model on every tile, not only tissue.")
@click.option("--min-tissue-um2", type=float, default=20_000.0, show_default=True,
              help="Ignore tissue pieces smaller than this.")
@click.option("--probabilities", is_flag=True, help="Also write MAP.prob.tif (class scores x255).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Report JSON path (default: MAP.json).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.pass_context
def segment(ctx: click.Context, slides: tuple[Path, ...], output: Path, model: Path | None,
            mpp: float | None, device: str, tile_px: int | None, batch_size: int | None,
            workers: int, no_tissue_mask: bool, min_tissue_um2: float, probabilities: bool,
            report_path: Path | None, overwrite: bool) -> None:
    """Segment SLIDES into a pyramidal class-map TIFF plus a JSON report."""
    from .engine import load_model
    from .pipeline import SegmentOptions, segment_slide
    from .tissue import TissueParams
    if len(slides) > 1:
        raise click.UsageError("several slides need an output folder; batch mode is not "
                               "available yet, run one slide per command")
    if batch_size is not None and batch_size < 1 or workers < 1:
        raise click.BadParameter("--batch-size and --workers must be at least 1")
    options = SegmentOptions(
        tile_px=tile_px, batch_size=batch_size, workers=workers, device=device, mpp=mpp,
        tissue=None if no_tissue_mask else TissueParams(min_tissue_um2=min_tissue_um2),
        probabilities=probabilities)
    loaded = load_model(model or default_model(), device=device)
    quiet = ctx.obj["quiet"]
    bar: list = []

    def on_start(n: int) -> None:
        if not quiet:
            bar.append(click.progressbar(length=n, label=slides[0].name, file=sys.stderr))
            bar[0].__enter__()

    try:
        report = segment_slide(slides[0], output, model=loaded, options=options,
                               report_path=report_path, overwrite=overwrite, on_start=on_start,
                               progress=(lambda n: bar[0].update(n)) if not quiet else None)
    finally:
        if bar:
            bar[0].__exit__(None, None, None)
    if not quiet:
        t = report["timing"]
        click.echo(f"wrote {output} ({report['map']['shape'][1]} x {report['map']['shape'][0]} px "
                   f"at {report['map']['mpp']:.3g} um/px) in {t['total_s']:.1f} s", err=True)
