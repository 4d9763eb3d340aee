"""Slide → tissue mask → tiles → (reader threads) → ONNX model → stitched label map → TIFF.

``segment_slide`` is the Python API behind ``wsiseg segment``. It logs (never prints), reports
progress through a callback, and returns the report it wrote. The label canvas lives in a
file in the staging folder beside the output, so memory stays flat however large the slide; every
output is written under a temporary name and they are moved into place together, the report
last (``wsiseg.outputs``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, engine
from .analysis import OUTPUT_SUFFIXES, AnalysisOptions, analyse_map, outputs_beside
from .canvas import DiskCanvas, DiskStack
from .engine import Model, check_tile_px, fixed_tile_px, load_model
from .files import write_text_atomic
from .labels import count_values
from .outputs import OutputError, OutputSet, check_distinct, check_output  # noqa: F401 (API)
from .qc import ConfidenceTally, qc_section, stain_lab
from .report import map_description, probabilities_description, report_json, run_report
from .slide import ReadPlan, Slide
from .slide import versions as slide_versions
from .tiling import Tile, TilePlan, choose_tile_px, computed_px, tile_grid, tiles_on_mask
from .tissue import TissueParams, tissue_mask
from .writer import version as writer_version
from .writer import write_pyramid, write_stack

log = logging.getLogger(__name__)


# Bounds on the options: beyond them a run cannot be meant (a typo, mm for um) and would only
# fail late, or exhaust memory.
MPP_RANGE = (0.05, 100.0)  # slide mpp override, microns per pixel
MAX_TILE_PX = 8192


@dataclass(frozen=True)
class SegmentOptions:
    tile_px: int | None = None  # None: the size (up to tiling.largest_tile_px) computing fewest px
    batch_size: int | None = None  # None: 1 on the CPU; on a GPU 4 tiles of 1024 px or as many px
    workers: int | None = None  # reader threads; None: default_workers()
    device: str = "auto"
    mpp: float | None = None  # slide mpp override
    tissue: TissueParams | None = field(default_factory=TissueParams)  # None: no tissue mask
    thumbnail_mpp: float = 8.0
    probabilities: bool = False

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_mpp_override(self.mpp)
        if self.tile_px is not None:
            check_tile_size(self.tile_px)
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not (math.isfinite(self.thumbnail_mpp) and self.thumbnail_mpp > 0):
            raise ValueError(f"thumbnail_mpp must be positive, got {self.thumbnail_mpp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_mpp_override(mpp: float) -> float:
    """A slide mpp given by hand, within :data:`MPP_RANGE` (with a hint for millimetres)."""
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        hint = (f"; that looks like millimetres: {mpp * 1000:g} um/px?" if 0 < mpp < lo
                and lo <= mpp * 1000 <= hi else
                " (microns per pixel at level 0: 0.25 for 40x, 0.5 for 20x)")
        raise ValueError(f"the slide's pixel size must be {lo:g} to {hi:g} um/px, got {mpp:g}"
                         + hint)
    return mpp


def check_tile_size(tile_px: int) -> int:
    """The model-independent bound on the tile size (``plan_tiles`` checks the model's)."""
    if not (isinstance(tile_px, int) and 1 <= tile_px <= MAX_TILE_PX):
        raise ValueError(f"the tile size must be 1 to {MAX_TILE_PX} px (a multiple of the "
                         f"model's size multiple), got {tile_px!r}")
    return tile_px


def default_report_path(map_path: Path) -> Path:
    return map_path.with_suffix(".json")


def default_workers() -> int:
    """Reader threads: half the cores (the rest feed the model on a CPU), 2 to 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def _timed_read(slide: Slide, plan: ReadPlan, tile: Tile) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    rgb, scanned = slide.read(plan, tile.out_row, tile.out_col, tile.in_h, tile.in_w)
    return rgb, scanned, time.perf_counter() - t0


def _read_ahead(slide: Slide, plan: ReadPlan, tiles: list[Tile], workers: int,
                read_s: list[float]) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
    """Yield (tile, rgb, scanned) in order while ``workers`` threads read further tiles; adds
    each read's seconds to ``read_s[0]``."""
    ahead = max(2, 2 * workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsiseg-read") as pool:
        queue: deque[tuple[Tile, Future]] = deque()
        todo = iter(tiles)

        def take() -> tuple[Tile, np.ndarray, np.ndarray]:
            tile, fut = queue.popleft()
            rgb, scanned, seconds = fut.result()
            read_s[0] += seconds
            return tile, rgb, scanned
        try:
            for t in todo:
                queue.append((t, pool.submit(_timed_read, slide, plan, t)))
                if len(queue) >= ahead:
                    yield take()
            while queue:
                yield take()
        finally:
            for _, fut in queue:
                fut.cancel()


def throughput(tiles: list[Tile], *, read_s: float, model_s: float, workers: int
               ) -> dict[str, float | str]:
    """Input Mpx/s the readers (all threads together) and the model sustain, and which of the
    two bounds the run (the slower one; reading overlaps the model when it is faster)."""
    mpx = computed_px(tiles) / 1e6
    reader = mpx * workers / read_s if read_s > 0 else float("inf")
    model = mpx / model_s if model_s > 0 else float("inf")
    return {"reader_mpx_per_s": reader, "model_mpx_per_s": model,
            "bound_by": "reader" if reader < model else "model"}


def run_tiles(model: Model, slide: Slide, plan: ReadPlan, tiles: list[Tile], *,
              canvas: DiskCanvas, probs: DiskStack | None, batch_size: int,
              workers: int, progress: Callable[[int], None] | None = None,
              tally: ConfidenceTally | None = None) -> dict:
    """Predict every tile and paste its core into ``canvas`` (and ``probs``), counting the top
    class probabilities of tissue pixels into ``tally``. A batch holds tiles of one shape (fitted
    edge tiles end it early). Returns timings and throughput."""
    background = model.contract.background_value
    t_model = 0.0
    read_s = [0.0]
    batch: list[tuple[Tile, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal t_model
        t0 = time.perf_counter()
        pred = model.predict(np.stack([b[1] for b in batch]), probabilities=probs is not None)
        t_model += time.perf_counter() - t0
        for i, (tile, _, scanned) in enumerate(batch):
            rs, cs = tile.core_in_tile
            core = pred.labels[i, rs, cs] + np.uint8(1)
            core[~scanned[rs, cs]] = background  # unscanned glass is never tissue
            canvas.paste(tile.core_row, tile.core_col, core)
            if tally is not None:
                tally.add(pred.top[i, rs, cs], core, background=background)
            if probs is not None:
                probs.paste(tile.core_row, tile.core_col, pred.scores[i][:, rs, cs])
        if progress:
            progress(len(batch))
        batch.clear()

    t0 = time.perf_counter()
    for item in _read_ahead(slide, plan, tiles, workers, read_s):
        if batch and item[1].shape != batch[0][1].shape:
            flush()
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    rates = throughput(tiles, read_s=read_s[0], model_s=t_model, workers=workers)
    log.info("reading %.3g Mpx/s, model %.3g Mpx/s: the %s bounds this run",
             rates["reader_mpx_per_s"], rates["model_mpx_per_s"], rates["bound_by"])
    return {"tiles_s": time.perf_counter() - t0, "model_s": t_model, "read_s": read_s[0],
            **rates}


def plan_tiles(slide: Slide, model: Model, options: SegmentOptions) -> TilePlan:
    """Thumbnail → tissue mask → tile size → tiles on tissue, for ``model`` on ``slide``."""
    c = model.contract
    plan = slide.plan(c.mpp)
    thumb, scanned, thumb_mpp = slide.thumbnail(thumbnail_mpp(slide, options))
    mask = scanned if options.tissue is None else \
        tissue_mask(thumb, scanned, mpp=thumb_mpp, params=options.tissue)
    tile_px, fit = options.tile_px, fit_multiple(model)
    if tile_px is None:  # not `or`: a tile size of 0 is an error, not "choose one"
        tile_px = fixed_tile_px(model) or choose_tile_px(
            plan.out_shape, None if options.tissue is None else mask,
            border_px=c.border_px, multiple=c.size_multiple, smallest_px=c.tile_px,
            fit_multiple=fit)
    check_tile_px(model, tile_px)
    all_tiles = tile_grid(plan.out_shape, tile_px=tile_px, border_px=c.border_px,
                          fit_multiple=fit)
    tiles = all_tiles if options.tissue is None else \
        tiles_on_mask(all_tiles, mask, out_shape=plan.out_shape)
    return TilePlan(plan, thumb, thumb_mpp, mask, tile_px, all_tiles, tiles, fit)


def fit_multiple(model: Model) -> int:
    """How edge tiles are fitted for ``model`` (tiling.tile_grid): to its size multiple on the
    CPU; to 128 px on a GPU, so that a run meets few input shapes (each new one costs a
    convolution-algorithm search); never for a model with a fixed input size or under
    TensorRT, whose engines are built for one shape."""
    if fixed_tile_px(model) or "TensorrtExecutionProvider" in model.providers:
        return 0
    m = model.contract.size_multiple
    return -(-128 // m) * m if model.on_gpu else m


def thumbnail_mpp(slide: Slide, options: SegmentOptions, max_px: float = 4e6) -> float:
    """``options.thumbnail_mpp``, coarsened so that the thumbnail holds at most ``max_px``
    pixels (tissue detection and the preview then cost the same on any slide)."""
    w, h = slide.info.l0_size
    area_um2 = w * h * slide.info.mpp ** 2
    return max(options.thumbnail_mpp, (area_um2 / max_px) ** 0.5)


def preview_mpp(slide: Slide, long_px: int = 900) -> float:
    """Resolution at which the slide's longer side spans about ``long_px`` preview pixels."""
    w, h = slide.info.l0_size
    return max(slide.info.mpp, max(w, h) * slide.info.mpp / long_px)


def planned_outputs(out_path: str | Path, *, report_path: str | Path | None = None,
                    options: SegmentOptions = SegmentOptions(),
                    analysis: AnalysisOptions | None = AnalysisOptions(),
                    outputs: dict[str, Path] | None = None) -> dict[str, Path]:
    """Every file a run writes, in publishing order: the map first, the report (the mark that
    the set is complete) last. Raises OutputError when the map is not a TIFF or two outputs
    share a path."""
    out_path = Path(out_path)
    outputs = outputs or outputs_beside(out_path)
    finals = {"map": out_path}
    if options.probabilities:
        finals["prob"] = out_path.with_suffix(".prob.tif")
    if analysis:
        wanted = analysis.wanted(outputs)
        finals.update({k: Path(p) for k, p in outputs.items() if p in wanted})
    finals["report"] = Path(report_path) if report_path else default_report_path(out_path)
    check_distinct(finals)
    return finals


def segment_slide(slide_path: str | Path, out_path: str | Path, *, model: Model | str | Path,
                  options: SegmentOptions = SegmentOptions(), report_path: str | Path | None = None,
                  analysis: AnalysisOptions | None = AnalysisOptions(),
                  outputs: dict[str, Path] | None = None, overwrite: bool = False,
                  on_start: Callable[[int], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Segment one slide into a pyramidal label TIFF at ``out_path`` and a JSON report.

    Unless ``analysis`` is None, the class statistics, TSR, TSR map, GeoJSON and preview are
    made from the written map (``wsiseg.analysis``), at ``outputs`` (default: beside the map).
    ``on_start(n_tiles)`` is called once the tile count is known, ``progress(n)`` after each
    batch. Returns the report (also written to ``report_path``, default ``MAP.json``).

    All files are written under temporary names and moved into place together, the report
    last (``wsiseg.outputs.OutputSet``): an error or interrupt leaves none of them."""
    t_start = time.perf_counter()
    finals = planned_outputs(out_path, report_path=report_path, options=options,
                             analysis=analysis, outputs=outputs)
    for p in finals.values():
        check_output(p, overwrite=overwrite)
    if isinstance(model, (str, Path)):
        model = load_model(model, device=options.device)
    with OutputSet(finals) as out_set, Slide(slide_path, mpp=options.mpp) as slide:
        # slide -> tissue mask -> tiles
        tp = plan_tiles(slide, model, options)
        preview = _preview_image(slide, tp, analysis)
        log.info("%s: %d of %d tiles of %dpx hold tissue", Path(slide_path).name, len(tp.tiles),
                 len(tp.all_tiles), tp.tile_px)
        if on_start:
            on_start(len(tp.tiles))
        # tiles -> model -> label map (staged)
        counts, levels, timing, qc = _infer_and_write(model, slide, tp, out_set, options, progress)
        # map -> analysis files (staged)
        t0 = time.perf_counter()
        section = _analyse(out_set, analysis, thumbnail=preview, counts=counts)
        timing["analysis_s"] = time.perf_counter() - t0
        timing["total_s"] = time.perf_counter() - t_start
        # -> the report, written last; then every file moves into place
        report = run_report(slide=slide.info, model=model, tiles=tp, map_path=finals["map"],
                            levels=levels, parameters=_parameters(model, options, tp),
                            counts=counts, qc=qc, section=section, timing=timing,
                            software=software_versions())
        write_text_atomic(out_set.staged("report"), report_json(report))
        out_set.publish()
    return report


def _batch_size(model: Model, options: SegmentOptions, tile_px: int) -> int:
    """1 tile per call on the CPU; on a GPU, calls of at most 4 Mpx (4 tiles of 1024²)."""
    return options.batch_size or (max(1, 4 * 1024 ** 2 // tile_px ** 2) if model.on_gpu else 1)


def _workers(options: SegmentOptions) -> int:
    return options.workers or default_workers()


def _parameters(model: Model, options: SegmentOptions, tp: TilePlan) -> dict:
    """The options as run: the tile size, batch size and reader threads decided."""
    return {**options.to_dict(), "tile_px": tp.tile_px,
            "batch_size": _batch_size(model, options, tp.tile_px), "workers": _workers(options)}


def _preview_image(slide: Slide, tp: TilePlan, analysis: AnalysisOptions | None
                   ) -> tuple[np.ndarray, float]:
    """The slide image for the preview: the thumbnail, or a finer one for a small slide."""
    if analysis and analysis.preview and preview_mpp(slide) < 0.75 * tp.thumb_mpp:
        rgb, _, rgb_mpp = slide.thumbnail(preview_mpp(slide))
        return rgb, rgb_mpp
    return tp.thumb, tp.thumb_mpp


def _infer_and_write(model: Model, slide: Slide, tp: TilePlan, out_set: OutputSet,
                     options: SegmentOptions, progress: Callable[[int], None] | None
                     ) -> tuple[np.ndarray, list[tuple[int, int]], dict[str, float], dict]:
    """Run the tiles into a label canvas in the staging folder and write the staged map (and
    probabilities); return (pixel count per map value, level shapes, timings, QC block)."""
    c, plan = model.contract, tp.plan
    with contextlib.ExitStack() as stack:
        canvas = stack.enter_context(DiskCanvas(out_set.work / "labels.u8", plan.out_shape,
                                                fill=c.background_value))
        probs = stack.enter_context(DiskStack(out_set.work, (c.n_classes, *plan.out_shape))) \
            if options.probabilities else None
        tally = ConfidenceTally()
        timing = run_tiles(model, slide, plan, tp.tiles, canvas=canvas, probs=probs,
                           batch_size=_batch_size(model, options, tp.tile_px),
                           workers=_workers(options), progress=progress, tally=tally)
        counts = count_values(canvas, c.n_classes + 1)
        qc = qc_section(c.qc, tally, stain_lab(tp.thumb, tp.mask))
        description = map_description(c, mpp=plan.mpp, slide=slide.info, qc=qc)
        colormap = [(0, 0, 0)] + [k.color for k in c.classes]
        t0 = time.perf_counter()
        levels = write_pyramid(out_set.staged("map"), canvas, mpp=plan.mpp, colormap=colormap,
                               description=description)
        if probs is not None:
            write_stack(out_set.staged("prob"), probs, mpp=plan.mpp, names=c.class_names,
                        description=probabilities_description(description))
        timing["write_s"] = time.perf_counter() - t0
    return counts, levels, timing, qc


def _analyse(out_set: OutputSet, analysis: AnalysisOptions | None, *,
             thumbnail: tuple[np.ndarray, float], counts: np.ndarray) -> dict:
    """The staged map's analysis (``wsiseg.analysis``), its files staged and named by their
    final paths in the section; {} when ``analysis`` is None."""
    if not analysis:
        return {}
    staged = {k: out_set.staged(k) for k in OUTPUT_SUFFIXES if k in out_set.finals}
    section = analyse_map(out_set.staged("map"), options=analysis, thumbnail=thumbnail,
                          outputs=staged, counts=counts)
    section["outputs"] = {k: str(out_set.finals[k]) for k in section["outputs"]}
    return section


def software_versions() -> dict[str, str]:
    return {"wsiseg": __version__, "python": platform.python_version(),
            "numpy": np.__version__, **engine.versions(), **slide_versions(),
            "tifffile": writer_version()}
