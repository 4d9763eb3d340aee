"""Slide → tissue mask → tiles → (reader threads) → ONNX model → stitched label map → TIFF.

``segment_slide`` is the Python API behind ``wsiseg segment``. It logs (never prints), reports
progress through a callback, and returns the report it wrote. The label canvas lives in a
disk-backed memmap beside the output, so memory stays flat however large the slide; every
output is written to a temporary name and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, engine
from .analysis import AnalysisOptions, analyse_map, outputs_beside
from .canvas import DiskCanvas, DiskStack
from .contract import to_metadata
from .engine import Model, check_tile_px, fixed_tile_px, load_model
from .files import write_text_atomic
from .slide import ReadPlan, Slide
from .slide import versions as slide_versions
from .tiling import Tile, choose_tile_px, computed_px_ratio, tile_grid, tiles_on_mask
from .tissue import TissueParams, area_mm2, tissue_mask
from .writer import version as writer_version
from .writer import write_pyramid, write_stack

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output path cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SegmentOptions:
    tile_px: int | None = None  # None: the size up to 1024 that computes the fewest pixels
    batch_size: int | None = None  # None: 1 on the CPU, 4 on a GPU
    workers: int | None = None  # reader threads; None: default_workers()
    device: str = "auto"
    mpp: float | None = None  # slide mpp override
    tissue: TissueParams | None = field(default_factory=TissueParams)  # None: no tissue mask
    thumbnail_mpp: float = 8.0
    probabilities: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def default_report_path(map_path: Path) -> Path:
    return map_path.with_suffix(".json")


def check_output(path: Path, *, overwrite: bool) -> None:
    """Fail early (before any work) on an output that exists or cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'map.tif'}")
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create output folder {folder} ({e.strerror}); "
                              "choose another -o") from None
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder; choose another -o")
    try:  # a real probe: permission bits say nothing to root or on read-only mounts
        with tempfile.TemporaryFile(dir=folder, prefix=".wsiseg-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable ({e.strerror}); "
                          "choose another -o") from None


def default_workers() -> int:
    """Reader threads: half the cores (the rest feed the model on a CPU), 2 to 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def _timed_read(slide: Slide, plan: ReadPlan, tile: Tile, tile_px: int
                ) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    rgb, scanned = slide.read(plan, tile.out_row, tile.out_col, tile_px, tile_px)
    return rgb, scanned, time.perf_counter() - t0


def _read_ahead(slide: Slide, plan: ReadPlan, tiles: list[Tile], tile_px: int, workers: int,
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
                queue.append((t, pool.submit(_timed_read, slide, plan, t, tile_px)))
                if len(queue) >= ahead:
                    yield take()
            while queue:
                yield take()
        finally:
            for _, fut in queue:
                fut.cancel()


def throughput(n_tiles: int, tile_px: int, *, read_s: float, model_s: float, workers: int
               ) -> dict[str, float | str]:
    """Input Mpx/s the readers (all threads together) and the model sustain, and which of the
    two bounds the run (the slower one; reading overlaps the model when it is faster)."""
    mpx = n_tiles * tile_px * tile_px / 1e6
    reader = mpx * workers / read_s if read_s > 0 else float("inf")
    model = mpx / model_s if model_s > 0 else float("inf")
    return {"reader_mpx_per_s": reader, "model_mpx_per_s": model,
            "bound_by": "reader" if reader < model else "model"}


def run_tiles(model: Model, slide: Slide, plan: ReadPlan, tiles: list[Tile], *,
              canvas: DiskCanvas, probs: DiskStack | None, tile_px: int, batch_size: int,
              workers: int, progress: Callable[[int], None] | None = None) -> dict:
    """Predict every tile and paste its core into ``canvas`` (and ``probs``). Returns timings."""
    background = model.contract.background_value
    t_model = 0.0
    read_s = [0.0]
    batch: list[tuple[Tile, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal t_model
        t0 = time.perf_counter()
        labels, scores = model.predict(np.stack([b[1] for b in batch]),
                                       probabilities=probs is not None)
        t_model += time.perf_counter() - t0
        for i, (tile, _, scanned) in enumerate(batch):
            rs, cs = tile.core_in_tile
            core = labels[i, rs, cs] + np.uint8(1)
            core[~scanned[rs, cs]] = background  # unscanned glass is never tissue
            canvas.paste(tile.core_row, tile.core_col, core)
            if probs is not None:
                probs.paste(tile.core_row, tile.core_col, scores[i][:, rs, cs])
        if progress:
            progress(len(batch))
        batch.clear()

    t0 = time.perf_counter()
    for item in _read_ahead(slide, plan, tiles, tile_px, workers, read_s):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    rates = throughput(len(tiles), tile_px, read_s=read_s[0], model_s=t_model, workers=workers)
    log.info("reading %.3g Mpx/s, model %.3g Mpx/s: the %s bounds this run",
             rates["reader_mpx_per_s"], rates["model_mpx_per_s"], rates["bound_by"])
    return {"tiles_s": time.perf_counter() - t0, "model_s": t_model, "read_s": read_s[0],
            **rates}


def class_counts(canvas: DiskCanvas, n_values: int, chunk_px: int = 1 << 20) -> np.ndarray:
    """Pixel count per map value 0..n_values-1, read in chunks (bincount widens to int64, so
    chunks stay small)."""
    counts = np.zeros(n_values, np.int64)
    rows = max(1, chunk_px // canvas.shape[1])
    for r in range(0, canvas.shape[0], rows):
        counts += np.bincount(canvas[r:r + rows].ravel(), minlength=n_values)[:n_values]
    return counts


@dataclass(frozen=True)
class TilePlan:
    """What segment_slide will read: the read plan, the tissue mask and the tiles."""

    plan: ReadPlan
    thumb: np.ndarray
    thumb_mpp: float
    mask: np.ndarray
    tile_px: int
    all_tiles: list[Tile]
    tiles: list[Tile]  # those run (on tissue, unless the mask is off)


def plan_tiles(slide: Slide, model: Model, options: SegmentOptions) -> TilePlan:
    """Thumbnail → tissue mask → tile size → tiles on tissue, for ``model`` on ``slide``."""
    c = model.contract
    plan = slide.plan(c.mpp)
    thumb, scanned, thumb_mpp = slide.thumbnail(thumbnail_mpp(slide, options))
    mask = scanned if options.tissue is None else \
        tissue_mask(thumb, scanned, mpp=thumb_mpp, params=options.tissue)
    tile_px = options.tile_px or fixed_tile_px(model) or choose_tile_px(
        plan.out_shape, None if options.tissue is None else mask,
        border_px=c.border_px, multiple=c.size_multiple, smallest_px=c.tile_px)
    check_tile_px(model, tile_px)
    all_tiles = tile_grid(plan.out_shape, tile_px=tile_px, border_px=c.border_px)
    tiles = all_tiles if options.tissue is None else \
        tiles_on_mask(all_tiles, mask, out_shape=plan.out_shape)
    return TilePlan(plan, thumb, thumb_mpp, mask, tile_px, all_tiles, tiles)


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
    batch. Returns the report (also written to ``report_path``, default ``MAP.json``), which is
    written last: its presence means the outputs are complete."""
    t_start = time.perf_counter()
    out_path = Path(out_path)
    report_path = Path(report_path) if report_path else default_report_path(out_path)
    outputs = outputs or outputs_beside(out_path)
    extra = [out_path.with_suffix(".prob.tif")] if options.probabilities else []
    for p in [out_path, report_path, *extra, *(analysis.wanted(outputs) if analysis else [])]:
        check_output(p, overwrite=overwrite)
    if isinstance(model, (str, Path)):
        model = load_model(model, device=options.device)
    c = model.contract
    on_gpu = model.providers[0] != "CPUExecutionProvider"
    batch_size = options.batch_size or (4 if on_gpu else 1)

    with Slide(slide_path, mpp=options.mpp) as slide:
        tp = plan_tiles(slide, model, options)
        plan, thumb, thumb_mpp, mask = tp.plan, tp.thumb, tp.thumb_mpp, tp.mask
        tile_px, all_tiles, tiles = tp.tile_px, tp.all_tiles, tp.tiles
        preview = (thumb, thumb_mpp)
        if analysis and analysis.preview and preview_mpp(slide) < 0.75 * thumb_mpp:
            rgb, _, rgb_mpp = slide.thumbnail(preview_mpp(slide))  # a small slide: finer
            preview = (rgb, rgb_mpp)
        log.info("%s: %d of %d tiles of %dpx hold tissue", Path(slide_path).name, len(tiles),
                 len(all_tiles), tile_px)
        if on_start:
            on_start(len(tiles))
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".wsiseg-"))
            canvas = stack.enter_context(DiskCanvas(Path(tmp) / "labels.u8", plan.out_shape,
                                                    fill=c.background_value))
            probs = stack.enter_context(DiskStack(tmp, (c.n_classes, *plan.out_shape))) \
                if options.probabilities else None
            workers = options.workers or default_workers()
            timing = run_tiles(model, slide, plan, tiles, canvas=canvas, probs=probs,
                               tile_px=tile_px, batch_size=batch_size, workers=workers,
                               progress=progress)
            counts = class_counts(canvas, c.n_classes + 1)
            description = {"wsiseg": __version__, "kind": "class map", "mpp": plan.mpp,
                           "slide": Path(slide_path).name, "slide_mpp": slide.info.mpp,
                           "legend": c.legend(), "contract": to_metadata(c)}
            colormap = [(0, 0, 0)] + [k.color for k in c.classes]
            t0 = time.perf_counter()
            levels = write_pyramid(out_path, canvas, mpp=plan.mpp, colormap=colormap,
                          description=description)
            if probs is not None:
                write_stack(out_path.with_suffix(".prob.tif"), probs, mpp=plan.mpp,
                            names=c.class_names,
                            description={**description, "kind": "class probabilities x255"})
            timing["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    section = analyse_map(out_path, options=analysis, thumbnail=preview,
                          outputs=outputs, counts=counts) if analysis else {}
    timing["analysis_s"] = time.perf_counter() - t0

    out_px = plan.out_shape[0] * plan.out_shape[1]
    px_mm2 = plan.mpp * plan.mpp / 1e6
    timing["total_s"] = time.perf_counter() - t_start
    timing["tissue_mpx_per_s"] = len(tiles) and (
        sum(t.core_h * t.core_w for t in tiles) / 1e6 / timing["tiles_s"])
    report = {
        "wsiseg": __version__,
        "slide": slide.info.to_dict(),
        "map": {"path": str(out_path), "mpp": plan.mpp, "shape": list(plan.out_shape),
                "levels": [list(lv) for lv in levels], "read_plan": plan.to_dict()},
        "model": model.to_dict(),
        "parameters": {**options.to_dict(), "tile_px": tile_px, "batch_size": batch_size,
                       "workers": workers, "precision": c.precision,
                       "border_px": c.border_px},
        "tiles": {"total": len(all_tiles), "run": len(tiles),
                  "computed_px_per_output_px": computed_px_ratio(len(tiles), tile_px=tile_px,
                                                                 out_px=out_px)},
        "tissue_mm2": area_mm2(mask, mpp=thumb_mpp),
        "class_area_mm2": {name: float(counts[i + 1]) * px_mm2
                           for i, name in enumerate(c.class_names)},
        "not_analysed_mm2": float(counts[0]) * px_mm2,
        **section,
        "timing": timing,
        "software": software_versions(),
    }
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    return report


def software_versions() -> dict[str, str]:
    return {"wsiseg": __version__, "python": platform.python_version(),
            "numpy": np.__version__, **engine.versions(), **slide_versions(),
            "tifffile": writer_version()}
