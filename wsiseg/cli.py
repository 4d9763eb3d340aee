"""Command line: the only module that knows click, exit codes and the terminal.

Exit codes: 0 success, 1 failure (bad slide, model, output, full disk, ...), 2 usage error (a bad
option value included), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM: docker stop, Slurm).
Every error is one line on stderr; progress too goes to stderr, machine-readable results
(``info --json``, ``report``) to stdout.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .cli_options import (
    Group,
    LazyDefault,
    checked,
    collect,
    configure_logging,
    default_from,
    log_settings,
    mpp_value,
    size_um,
    tile_px_value,
    verbosity,
)

if TYPE_CHECKING:  # imported where used: `wsiseg --version` needs neither numpy nor onnxruntime
    from .analysis import AnalysisOptions
    from .pipeline import SegmentOptions

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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
@verbosity
@click.pass_context
def main(ctx: click.Context) -> None:
    """Segment H&E whole-slide images into tissue classes and measure the tumour-stroma ratio."""
    configure_logging(log_settings(ctx))


MPP_OPTION = dict(type=float, callback=checked(mpp_value),
                  help="Level-0 microns per pixel, overriding the slide's (0.05-100).")


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", **MPP_OPTION)
@click.option("--model", type=click.Path(path_type=Path), help="Model whose read plan to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@verbosity
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
                      tsr_field_um: float, tsr_margin_um: float) -> AnalysisOptions:
    """The options of :func:`analysis_flags` as an ``AnalysisOptions``."""
    from .analysis import AnalysisOptions
    from .tsr import TSRConfig
    return AnalysisOptions(tsr=not no_tsr, geojson=not no_geojson, preview=not no_preview,
                           csv=not no_csv, tsr_config=TSRConfig(field_diameter_um=tsr_field_um,
                                                                bulk_margin_um=tsr_margin_um))


def _segment_options(mpp: float | None, device: str, tile_px: int | None,
                     batch_size: int | None, workers: int | None, no_tissue_mask: bool,
                     min_tissue_um2: float, probabilities: bool) -> SegmentOptions:
    """The run options of ``segment`` as a ``SegmentOptions``."""
    from .pipeline import SegmentOptions
    from .tissue import TissueParams
    return SegmentOptions(
        tile_px=tile_px, batch_size=batch_size, workers=workers, device=device, mpp=mpp,
        tissue=None if no_tissue_mask else TissueParams(min_tissue_um2=min_tissue_um2),
        probabilities=probabilities)


def analysis_flags(f):
    """Options shared by ``segment`` and ``report``."""
    for opt in reversed([
        click.option("--no-tsr", is_flag=True, help="Skip the TSR numbers and the TSR map."),
        click.option("--no-geojson", is_flag=True, help="Skip the QuPath GeoJSON."),
        click.option("--no-preview", is_flag=True, help="Skip the preview PNG."),
        click.option("--no-csv", is_flag=True, help="Skip the one-row CSV."),
        click.option("--tsr-field-um", type=float, cls=LazyDefault, show_default=True,
                     default=default_from("tsr", "TSRConfig", "field_diameter_um"),
                     callback=checked(size_um(zero_ok=False)),
                     help="Diameter of the circular TSR field."),
        click.option("--tsr-margin-um", type=float, cls=LazyDefault, show_default=True,
                     default=default_from("tsr", "TSRConfig", "bulk_margin_um"),
                     callback=checked(size_um(zero_ok=True)),
                     help="Margin added around the tumour bulk for whole-tumour TSR."),
        verbosity,
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
@click.option("--mpp", **MPP_OPTION)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              cls=LazyDefault, default=default_from("pipeline", "SegmentOptions", "device"),
              show_default=True, help="Where to run the model; auto = CUDA if available, else CPU.")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32",
              show_default=True,
              help="Run the model's twin of this precision, found beside it (X.onnx -> "
                   "X.int8.onnx); int8 is faster on CPUs, fp16 on GPUs.")
@click.option("--tile-px", type=int, callback=checked(tile_px_value),
              help="Input tile size, a multiple of the model's, at most 8192 (default: the size "
                   "up to 1024, 2048 for wide borders, that computes the fewest pixels).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Tiles per model call (default 1 on CPU, 4 on GPU).")
@click.option("--workers", type=click.IntRange(min=1), cls=LazyDefault, show_default=True,
              default=lambda: importlib.import_module("wsiseg.pipeline").default_workers(),
              help="Slide reader threads (default: half the cores, 2 to 8).")
@click.option("--no-tissue-mask", is_flag=True,
              help="Run the model on every tile, not only tissue.")
@click.option("--min-tissue-um2", type=float, cls=LazyDefault, show_default=True,
              default=default_from("tissue", "TissueParams", "min_tissue_um2"),
              callback=checked(size_um(zero_ok=True)),
              help="Ignore tissue pieces smaller than this.")
@click.option("--probabilities", is_flag=True, help="Also write MAP.prob.tif (class scores x255).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Report JSON path (default: MAP.json; one slide only).")
@analysis_flags
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.pass_context
@collect("options", _segment_options)
@collect("analysis", _analysis_options)
def segment(ctx: click.Context, slides: tuple[Path, ...], output: Path, list_file: Path | None,
            model: Path | None, precision: str, report_path: Path | None, overwrite: bool,
            options: SegmentOptions, analysis: AnalysisOptions) -> None:
    """Segment SLIDES into pyramidal class-map TIFFs with reports, TSR, GeoJSON and previews.

    One slide: -o is the map file. Several slides, folders, glob patterns or --list: -o is
    an output folder; slides already done there are skipped, each slide is locked while it
    runs, a failing slide does not stop the others, and OUT/status.tsv lists what happened."""
    from .engine import load_model
    if not slides and list_file is None:
        raise click.UsageError("give at least one slide (or --list FILE)")
    batch = _is_batch(slides, list_file, output)
    _check_outputs(batch, output, report_path, options, analysis)
    loaded = load_model(_precision_twin(model or default_model(), precision),
                        device=options.device)
    if loaded.contract.precision != precision:
        raise click.BadParameter(f"{Path(loaded.path).name} says precision "
                                 f"{loaded.contract.precision}, not {precision}; rebuild the twin "
                                 "or pick its --precision", param_hint="'--precision'")
    if options.tile_px is not None:
        from .engine import ModelError, check_tile_px
        try:
            check_tile_px(loaded, options.tile_px)
        except ModelError as e:
            raise click.BadParameter(str(e), param_hint="'--tile-px'") from None
    run = _segment_batch if batch else _segment_one
    run(ctx, slides=slides, list_file=list_file, output=output, model=loaded, options=options,
        analysis=analysis, report_path=report_path, overwrite=overwrite)


def _is_batch(slides: tuple[Path, ...], list_file: Path | None, output: Path) -> bool:
    """Several slides, a folder, a pattern or a list; or one slide into an existing folder
    (one named like a map, ``X.tif``, is an error in ``_check_outputs``)."""
    from .outputs import MAP_SUFFIXES
    return (len(slides) != 1 or list_file is not None or slides[0].is_dir()
            or any(ch in str(slides[0]) for ch in "*?[")
            or (output.is_dir() and output.suffix.lower() not in MAP_SUFFIXES))


def _check_outputs(batch: bool, output: Path, report_path: Path | None, options, analysis
                   ) -> None:
    """Output paths that cannot work are usage errors, found before the model loads."""
    from .outputs import OutputError
    from .pipeline import planned_outputs
    if batch:
        if report_path is not None:
            raise click.UsageError("--report names one file; in batch mode the reports go to "
                                   "the output folder")
        if output.exists() and not output.is_dir():
            raise click.BadParameter(f"{output} is a file; with several slides -o names the "
                                     "output folder", param_hint="'-o' / '--output'")
        return
    if output.is_dir():
        raise click.BadParameter(f"{output} is a folder; name the map file inside it, e.g. "
                                 f"{output / 'map.tif'}", param_hint="'-o' / '--output'")
    try:
        planned_outputs(output, report_path=report_path, options=options, analysis=analysis)
    except OutputError as e:
        raise click.BadParameter(str(e), param_hint="'-o' / '--report'") from None


def _precision_twin(model: Path, precision: str) -> Path:
    """The model file to run for ``--precision``: the twin beside ``model`` (X.int8.onnx),
    which must exist (usage error otherwise)."""
    from .contract import twin_path
    if precision == "fp32" or model.name.endswith(f".{precision}.onnx"):
        return model
    twin = twin_path(model, precision)
    if not twin.is_file():
        raise click.BadParameter(f"no {twin.name} beside {model}; make it with "
                                 f"wsiseg-train quantize (int8) or export --fp16, or drop "
                                 f"--precision", param_hint="'--precision'")
    return twin


def _segment_one(ctx: click.Context, *, slides, output, model, options, analysis, report_path,
                 overwrite, list_file) -> None:
    from .pipeline import segment_slide
    from .report import summary
    quiet = ctx.obj["quiet"]
    with _progress(quiet, slides[0].name) as (on_start, progress):
        report = segment_slide(slides[0], output, model=model, options=options,
                               analysis=analysis, report_path=report_path, overwrite=overwrite,
                               on_start=on_start, progress=progress)
    if not quiet:
        click.echo(summary(output, report), err=True)
    warning = qc_warning_line(report.get("qc", {}))
    if warning:
        click.echo(f"wsiseg: warning: {slides[0].name}: {warning}", err=True)


def _segment_batch(ctx: click.Context, *, slides, output, model, options, analysis,
                   report_path, overwrite, list_file) -> None:
    from .analysis import OUTPUT_SUFFIXES
    from .batch import FAILED, expand_slides, run_batch
    from .pipeline import segment_slide
    quiet = ctx.obj["quiet"]
    from .files import make_folders, remove_empty
    paths = expand_slides(list(slides), list_file=list_file)
    created = make_folders([output])

    def process(slide: Path, outs: dict[str, Path]) -> None:
        with _progress(quiet, slide.name) as (on_start, progress):
            report = segment_slide(slide, outs["map"], model=model, options=options,
                                   analysis=analysis, report_path=outs["report"],
                                   overwrite=True, on_start=on_start, progress=progress,
                                   outputs={k: outs[k] for k in OUTPUT_SUFFIXES})
        warning = qc_warning_line(report.get("qc", {}))
        if warning:
            click.echo(f"wsiseg: warning: {slide.name}: {warning}", err=True)

    try:
        statuses = run_batch(paths, output, process=process, overwrite=overwrite)
    except BaseException:
        remove_empty(created)  # a folder made for this batch, unless something was written
        raise
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


def qc_warning_line(qc: dict) -> str | None:
    from .qc import warning_line
    return warning_line(qc)


@main.command()
@click.argument("map_path", metavar="MAP", type=click.Path(path_type=Path))
@click.option("--slide", type=click.Path(path_type=Path),
              help="The slide the map was made from (for the preview's background).")
@click.option("--mpp", **MPP_OPTION)
@analysis_flags
@click.option("--overwrite", is_flag=True, help="Replace existing analysis outputs.")
@collect("options", _analysis_options)
def report(map_path: Path, slide: Path | None, mpp: float | None, overwrite: bool,
           options: AnalysisOptions) -> None:
    """Measure an existing class MAP (no inference): class areas, TSR, TSR map, GeoJSON,
    preview and CSV beside the map; the measurements as JSON on stdout."""
    from .analysis import analyse_map, outputs_beside
    from .outputs import OutputSet, check_output
    if not map_path.is_file():
        raise FileNotFoundError(f"map not found: {map_path}")
    wanted = options.wanted(outputs_beside(map_path))
    finals = {k: p for k, p in outputs_beside(map_path).items() if p in wanted}
    for path in finals.values():
        check_output(path, overwrite=overwrite)
    thumbnail = None
    if slide is not None:
        from .slide import Slide
        with Slide(slide, mpp=mpp) as s:
            rgb, _, thumb_mpp = s.thumbnail(8.0)
        thumbnail = (rgb, thumb_mpp)
    with OutputSet(finals) as out_set:  # all the files, or none of them
        section = analyse_map(map_path, options=options, thumbnail=thumbnail,
                              outputs={k: out_set.staged(k) for k in finals})
        out_set.publish()
    section["outputs"] = {k: str(finals[k]) for k in section["outputs"]}
    click.echo(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
