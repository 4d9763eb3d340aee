"""Tile-size agreement: do maps made with different tile sizes agree, and are tile edges visible?

A seam shows up as disagreement that concentrates where one tiling's cores meet. This module
segments a slide twice through ``segment_slide`` (every tile run, no analysis outputs), once per
tile size, and compares the maps:

- ``agreement``: share of map pixels with the same label in both maps (slide margin excluded);
- ``near_edges`` / ``elsewhere``: disagreement within ``edge_px`` of an interior core edge of
  either tiling, and on all other pixels; their ratio is the seam factor (1 = no seams);
- ``slide_margin``: disagreement within ``margin_px`` of the map's outer edge, reported apart:
  there windows stick out of the slide and read background, which the two tilings cut at
  different places (a separate effect from seams between tiles).

:func:`tile_agreement` (or ``benchmarks/bench_seams.py --model M.onnx``) reruns it for any
model, e.g. after the default model is replaced.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Model, load_model
from .pipeline import SegmentOptions, segment_slide
from .tiling import tile_grid
from .writer import read_level


@dataclass(frozen=True)
class TiledMap:
    tile_px: int
    labels: np.ndarray
    computed_px_per_output_px: float
    tiles: int
    tiles_s: float
    total_s: float


def segment_in_memory(slide: str | Path, model: Model, *, tile_px: int,
                      mpp: float | None = None) -> TiledMap:
    """The full-resolution map of ``slide`` with ``tile_px`` tiles, every tile run."""
    opts = SegmentOptions(tile_px=tile_px, tissue=None, mpp=mpp, device="cpu")
    with tempfile.TemporaryDirectory(prefix="wsiseg-seams-") as tmp:
        report = segment_slide(slide, Path(tmp) / "map.tif", model=model, options=opts,
                               analysis=None)
        labels = read_level(Path(tmp) / "map.tif")
    return TiledMap(tile_px, labels, report["tiles"]["computed_px_per_output_px"],
                    report["tiles"]["run"], report["timing"]["tiles_s"],
                    report["timing"]["total_s"])


def core_edge_mask(shape: tuple[int, int], *, tile_px: int, border_px: int,
                   edge_px: int) -> np.ndarray:
    """True within ``edge_px`` of a boundary between two tile cores (not the map's edge)."""
    rows, cols = shape
    near = np.zeros(shape, bool)
    tiles = tile_grid(shape, tile_px=tile_px, border_px=border_px)
    cuts_r = sorted({t.core_row for t in tiles if t.core_row > 0})
    cuts_c = sorted({t.core_col for t in tiles if t.core_col > 0})
    for r in cuts_r:
        near[max(0, r - edge_px):min(rows, r + edge_px), :] = True
    for c in cuts_c:
        near[:, max(0, c - edge_px):min(cols, c + edge_px)] = True
    return near


def margin_mask(shape: tuple[int, int], margin_px: int) -> np.ndarray:
    """True within ``margin_px`` of the map's outer edge."""
    m = np.ones(shape, bool)
    if 2 * margin_px < min(shape):
        m[margin_px:shape[0] - margin_px, margin_px:shape[1] - margin_px] = False
    return m


def _rate(differ: np.ndarray, where: np.ndarray) -> float:
    n = int(where.sum())
    return float(differ[where].sum()) / n if n else 0.0


def compare_maps(a: np.ndarray, b: np.ndarray, *, tile_sizes: tuple[int, int], border_px: int,
                 edge_px: int = 4, margin_px: int | None = None) -> dict:
    """Agreement and seam statistics of two label maps made with ``tile_sizes``."""
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} and {b.shape}")
    margin_px = border_px if margin_px is None else margin_px
    differ = a != b
    margin = margin_mask(a.shape, margin_px)
    near = np.zeros(a.shape, bool)
    for t in tile_sizes:
        near |= core_edge_mask(a.shape, tile_px=t, border_px=border_px, edge_px=edge_px)
    inner = ~margin
    near_rate = _rate(differ, near & inner)
    else_rate = _rate(differ, ~near & inner)
    return {"pixels": int(inner.sum()), "agreement": 1.0 - _rate(differ, inner),
            "agreement_whole_map": 1.0 - float(differ.mean()),
            "near_edges": near_rate, "elsewhere": else_rate,
            "seam_factor": near_rate / else_rate if else_rate else
            (1.0 if near_rate == 0 else float("inf")),
            "slide_margin": _rate(differ, margin), "edge_px": edge_px, "margin_px": margin_px}


def tile_agreement(slide: str | Path, model: Model | str | Path, *,
                   tile_sizes: tuple[int, int] = (256, 1024), mpp: float | None = None,
                   edge_px: int = 4) -> dict:
    """Segment ``slide`` with each tile size and compare the maps (see the module docstring)."""
    if isinstance(model, (str, Path)):
        model = load_model(model, device="cpu")
    maps = [segment_in_memory(slide, model, tile_px=t, mpp=mpp) for t in tile_sizes]
    stats = compare_maps(maps[0].labels, maps[1].labels, tile_sizes=tile_sizes,
                         border_px=model.contract.border_px, edge_px=edge_px)
    return {"slide": Path(slide).name, "model": f"{model.contract.name} "
            f"v{model.contract.version}", "border_px": model.contract.border_px,
            "map_shape": list(maps[0].labels.shape), **stats,
            "runs": [{"tile_px": m.tile_px, "tiles": m.tiles,
                      "computed_px_per_output_px": m.computed_px_per_output_px,
                      "tiles_s": m.tiles_s, "total_s": m.total_s} for m in maps]}
