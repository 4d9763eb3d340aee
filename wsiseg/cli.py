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
    """``$WSISEG_MODEL``, else the model shipped inside the package (``wsiseg.models``, which
    is the repository's ``models/`` folder; found beside the sources when run from a checkout)."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    try:
        shipped = Path(str(resources.files("wsiseg.models").joinpath(DEFAULT_MODEL_FILE)))
    except ModuleNotFoundError:
        shipped = Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL_FILE
    if not shipped.is_file():
        raise click.UsageError(f"no default model is installed; pass --model MODEL.onnx "
                               f"or set {DEFAULT_MODEL_ENV}")
    return shipped


def _user_errors() -> tuple[type[BaseException], ...]:
    from .analysis import MapError
    from .batch import BatchInputError
    from .contract import ContractError
    from .engine import ModelError
    from .pipeline import OutputError
    from .slide import SlideError
    return (SlideError, ModelError, ContractError, OutputError, MapError, BatchInputError,
            FileNotFoundError,
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
    levels = [logging.WARNING, logging.INFO, logging.DEBUG]
    level = logging.ERROR if quiet else levels[min(verbose, 2)]
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
    with Slide(slide, mpp=mpp, require_mpp=False) as s:
        known = s.info.mpp_source != "missing"
        data = {"slide": s.info.to_dict(), "model_mpp": target_mpp,
                "read_plan": s.plan(target_mpp).to_dict() if known else None}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    i = data["slide"]
    click.echo(f"{slide}\n  vendor      {i['vendor']}\n  size        {i['width_px']} x "
               f"{i['height_px']} px\n  mpp         "
               + (f"{i['mpp']:.4g} um/px ({i['mpp_source']})" if known else "unknown"))
    for k, (lvl, ds) in enumerate(zip(i["levels"], i["level_downsamples"])):
        click.echo(f"  level {k}     {lvl[0]} x {lvl[1]} px, downsample {ds:.4g}")
    p = data["read_plan"]
    if p is None:
        click.echo("  the slide does not record its pixel size: segment needs --mpp")
        return
    how = (f"resampled by {p['level_px_per_out_px']:.4g}" if p["resampled"] else
           f"averaged over {p['box']}x{p['box']} px" if p["box"] > 1 else "as is")
    click.echo(f"  at {target_mpp:g} um/px: level {p['level']} {how} -> "
               f"{p['out_shape'][1]} x {p['out_shape'][0]} px map (mpp {p['mpp']:.4g})")


def _analysis_options(no_tsr: bool, no_geojson: bool, no_preview: bool, no_csv: bool,
                      tsr_field_um: float, tsr_margin_um: float):
    from .analysis import AnalysisOptions
    from .tsr import TSRConfig
    return AnalysisOptions(tsr=not no_tsr, geojson=not no_geojson, preview=not no_preview,
                           csv=not no_csv, tsr_config=TSRConfig(field_diameter_um=tsr_field_um,
                                                                bulk_margin_um=tsr_margin_um))


def analysis_flags(f):
    """Options shared by ``segment`` and ``report``."""
    for opt in reversed([
        click.option("--no-tsr", is_flag=True, help="Skip the TSR numbers and the TSR map."),
        click.option("--no-geojson", is_flag=True, help="Skip the QuPath GeoJSON."),
        click.option("--no-preview", is_flag=True, help="Skip the preview PNG."),
        click.option("--no-csv", is_flag=True, help="Skip the one-row CSV."),
        click.option("--tsr-field-um", type=float, default=2200.0, show_default=True,
                     help="Diameter of the circular TSR field."),
        click.option("--tsr-margin-um", type=float, default=250.0, show_default=True,
                     help="Margin added around the tumour bulk for whole-tumour TSR."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Label map TIFF to write; a folder when several slides are given.")
@click.option("--list", "list_file", type=click.Path(path_type=Path),
              help="File listing slides, one path per line (batch mode).")
@click.option("--model", type=click.Path(path_type=Path),
              help=f"ONNX model with a wsiseg contract (default: ${DEFAULT_MODEL_ENV} or the "
                   "shipped model).")
@click.option("--mpp", type=float, help="Slide level-0 microns per pixel, overriding the slide's.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="Where to run the model; auto = CUDA if available, else CPU.")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32",
              show_default=True,
              help="Run the model's twin of this precision, found beside it (X.onnx -> "
                   "X.int8.onnx); int8 is faster on CPUs, fp16 on GPUs.")
@click.option("--tile-px", type=int,
              help="Input tile size, a multiple of the model's (default: the size up to 1024 "
                   "that computes the fewest pixels).")
@click.option("--batch-size", type=int, help="Tiles per model call (default 1 on CPU, 4 on GPU).")
@click.option("--workers", type=int,
              help="Slide reader threads (default: half the cores, 2 to 8).")
@click.option("--no-tissue-mask", is_flag=True,
              help="Run the model on every tile, not only tissue.")
@click.option("--min-tissue-um2", type=float, default=20_000.0, show_default=True,
              help="Ignore tissue pieces smaller than this.")
@click.option("--probabilities", is_flag=True, help="Also write MAP.prob.tif (class scores x255).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Report JSON path (default: MAP.json; one slide only).")
@analysis_flags
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.pass_context
def segment(ctx: click.Context, slides: tuple[Path, ...], output: Path, list_file: Path | None,
            model: Path | None, mpp: float | None, device: str, precision: str,
            tile_px: int | None, batch_size: int | None, workers: int | None,
            no_tissue_mask: bool, min_tissue_um2: float,
            probabilities: bool, report_path: Path | None, no_tsr: bool, no_geojson: bool,
            no_preview: bool, no_csv: bool, tsr_field_um: float, tsr_margin_um: float,
            overwrite: bool) -> None:
    """Segment SLIDES into pyramidal class-map TIFFs with reports, TSR, GeoJSON and previews.

    One slide: -o is the map file. Several slides, folders, glob patterns or --list: -o is
    an output folder; slides already done there are skipped, each slide is locked while it
    runs, a failing slide does not stop the others, and OUT/status.tsv lists what happened."""
    from .engine import load_model
    from .pipeline import SegmentOptions
    from .tissue import TissueParams
    if not slides and list_file is None:
        raise click.UsageError("give at least one slide (or --list FILE)")
    if (batch_size is not None and batch_size < 1) or (workers is not None and workers < 1):
        raise click.BadParameter("--batch-size and --workers must be at least 1")
    options = SegmentOptions(
        tile_px=tile_px, batch_size=batch_size, workers=workers, device=device, mpp=mpp,
        tissue=None if no_tissue_mask else TissueParams(min_tissue_um2=min_tissue_um2),
        probabilities=probabilities)
    analysis = _analysis_options(no_tsr, no_geojson, no_preview, no_csv, tsr_field_um,
                                 tsr_margin_um)
    batch = (len(slides) != 1 or list_file is not None or slides[0].is_dir()
             or any(ch in str(slides[0]) for ch in "*?[") or output.is_dir())
    if batch and report_path is not None:
        raise click.UsageError("--report names one file; in batch mode the reports go to the "
                               "output folder")
    loaded = load_model(_precision_twin(ctx, model or default_model(), precision), device=device)
    if precision != "fp32" and loaded.contract.precision != precision:
        click.echo(f"wsiseg: error: {loaded.path} says precision {loaded.contract.precision}, "
                   f"not {precision}; rebuild the twin", err=True)
        ctx.exit(2)
    run = _segment_batch if batch else _segment_one
    run(ctx, slides=slides, list_file=list_file, output=output, model=loaded, options=options,
        analysis=analysis, report_path=report_path, overwrite=overwrite)


def _precision_twin(ctx: click.Context, model: Path, precision: str) -> Path:
    """The model file to run for ``--precision`` (exit 2 when its twin is missing)."""
    from .contract import twin_path
    if precision == "fp32" or model.name.endswith(f".{precision}.onnx"):
        return model
    twin = twin_path(model, precision)
    if not twin.is_file():
        click.echo(f"wsiseg: error: --precision {precision}: no {twin.name} beside {model}; "
                   f"make it with wsiseg-train quantize (int8) or fp16, or drop --precision",
                   err=True)
        ctx.exit(2)
    return twin


def _segment_one(ctx: click.Context, *, slides, output, model, options, analysis, report_path,
                 overwrite, list_file) -> None:
    from .pipeline import segment_slide
    quiet = ctx.obj["quiet"]
    with _progress(quiet, slides[0].name) as (on_start, progress):
        report = segment_slide(slides[0], output, model=model, options=options,
                               analysis=analysis, report_path=report_path, overwrite=overwrite,
                               on_start=on_start, progress=progress)
    if not quiet:
        click.echo(_summary(output, report), err=True)


def _segment_batch(ctx: click.Context, *, slides, output, model, options, analysis,
                   report_path, overwrite, list_file) -> None:
    from .analysis import OUTPUT_SUFFIXES
    from .batch import FAILED, expand_slides, run_batch
    from .pipeline import segment_slide
    quiet = ctx.obj["quiet"]
    paths = expand_slides(list(slides), list_file=list_file)
    output.mkdir(parents=True, exist_ok=True)

    def process(slide: Path, outs: dict[str, Path]) -> None:
        with _progress(quiet, slide.name) as (on_start, progress):
            segment_slide(slide, outs["map"], model=model, options=options, analysis=analysis,
                          report_path=outs["report"], overwrite=True, on_start=on_start,
                          progress=progress, outputs={k: outs[k] for k in OUTPUT_SUFFIXES})

    statuses = run_batch(paths, output, process=process, overwrite=overwrite)
    counts = {k: sum(s.status == k for s in statuses) for k in ("ok", "skipped", FAILED)}
    if not quiet:
        click.echo(f"{len(statuses)} slides: {counts['ok']} ok, {counts['skipped']} skipped, "
                   f"{counts[FAILED]} failed; see {output / 'status.tsv'}", err=True)
    for s in statuses:
        if s.status == FAILED:
            click.echo(f"wsiseg: failed: {s.slide}: {s.reason}", err=True)
    if counts[FAILED]:
        ctx.exit(1)


class _progress:
    """Progress bar on stderr, sized once the engine knows the tile count."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label, self.bar = quiet, label, None

    def __enter__(self):
        def on_start(n: int) -> None:
            if not self.quiet:
                self.bar = click.progressbar(length=n, label=self.label, file=sys.stderr)
                self.bar.__enter__()

        def progress(n: int) -> None:
            if self.bar is not None:
                self.bar.update(n)
        return on_start, progress

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _summary(output: Path, report: dict) -> str:
    lines = [f"wrote {output} ({report['map']['shape'][1]} x {report['map']['shape'][0]} px at "
             f"{report['map']['mpp']:.3g} um/px) in {report['timing']['total_s']:.1f} s"]
    tsr = report.get("tsr")
    if tsr:
        hot = tsr.get("hotspot")
        lines.append(f"TSR hot spot: {hot['tsr_pct']:.0f}% ({hot['category']})" if hot
                     else f"TSR hot spot: none ({tsr.get('hotspot_reason')})")
    return "\n".join(lines)


@main.command()
@click.argument("map_path", metavar="MAP", type=click.Path(path_type=Path))
@click.option("--slide", type=click.Path(path_type=Path),
              help="The slide the map was made from (for the preview's background).")
@click.option("--mpp", type=float, help="Slide level-0 microns per pixel, overriding the slide's.")
@analysis_flags
@click.option("--overwrite", is_flag=True, help="Replace existing analysis outputs.")
def report(map_path: Path, slide: Path | None, mpp: float | None, no_tsr: bool, no_geojson: bool,
           no_preview: bool, no_csv: bool, tsr_field_um: float, tsr_margin_um: float,
           overwrite: bool) -> None:
    """Measure an existing class MAP (no inference): class areas, TSR, TSR map, GeoJSON,
    preview and CSV beside the map; the measurements as JSON on stdout."""
    from .analysis import analyse_map, outputs_beside
    from .pipeline import check_output
    if not map_path.is_file():
        raise FileNotFoundError(f"map not found: {map_path}")
    options = _analysis_options(no_tsr, no_geojson, no_preview, no_csv, tsr_field_um,
                                tsr_margin_um)
    outputs = outputs_beside(map_path)
    for path in options.wanted(outputs):
        check_output(path, overwrite=overwrite)
    thumbnail = None
    if slide is not None:
        from .slide import Slide
        with Slide(slide, mpp=mpp) as s:
            rgb, _, thumb_mpp = s.thumbnail(8.0)
        thumbnail = (rgb, thumb_mpp)
    section = analyse_map(map_path, options=options, thumbnail=thumbnail, outputs=outputs)
    click.echo(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
