"""Tile grid on the output frame: overlapping input windows whose centres tile the map.

Each tile reads up to ``tile_px`` × ``tile_px`` input pixels and keeps only its centre (the
core), ``border_px`` inside each edge; cores abut exactly, so every output pixel is predicted by one
tile with at least ``border_px`` of context on every side. Windows that stick out of the slide
read background there (as the whole-region reference does), which is what makes the tiled map
equal to a single pass over the whole region for any model whose receptive field radius is at
most ``border_px``.

Tiles at the bottom and right edges, whose core is cut short by the map's edge, are *fitted*
when the grid is given a ``fit_multiple``: their input shrinks to the short core plus its
borders (rounded up to the multiple), instead of reading and computing a full square of mostly
empty glass past the slide. Their top-left corner and border stay where they were, so the
output is the same; a small slide runs as one tile of its own shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .slide import ReadPlan


@dataclass(frozen=True)
class Tile:
    out_row: int  # top-left of the input window on the output grid (may be negative)
    out_col: int
    core_row: int  # top-left of the kept core on the output grid
    core_col: int
    core_h: int  # size of the kept core (smaller at the bottom and right edges)
    core_w: int
    in_h: int  # size of the input window (smaller at those edges when fitted)
    in_w: int

    @property
    def core_in_tile(self) -> tuple[slice, slice]:
        """Where the core sits inside the tile's output array."""
        r, c = self.core_row - self.out_row, self.core_col - self.out_col
        return slice(r, r + self.core_h), slice(c, c + self.core_w)


@dataclass(frozen=True)
class TilePlan:
    """What a run reads: the slide's read plan, the tissue mask (on a thumbnail) and the tiles."""

    plan: ReadPlan
    thumb: np.ndarray
    thumb_mpp: float
    mask: np.ndarray
    tile_px: int
    all_tiles: list[Tile]
    tiles: list[Tile]  # those run (on tissue, unless the mask is off)
    fit_multiple: int = 0  # edge tiles fitted to this multiple (0: every tile tile_px square)


def fitted_px(core_px: int, *, tile_px: int, border_px: int, fit_multiple: int) -> int:
    """Input size of a tile whose core is ``core_px`` long: the full ``tile_px``, or (fitted) the
    core plus both borders rounded up to ``fit_multiple`` (0 = never fitted)."""
    if fit_multiple < 1:
        return tile_px
    return min(tile_px, -(-(core_px + 2 * border_px) // fit_multiple) * fit_multiple)


def tile_grid(out_shape: tuple[int, int], *, tile_px: int, border_px: int,
              fit_multiple: int = 0) -> list[Tile]:
    """All tiles covering an output map of ``out_shape`` (rows, cols), row-major order; edge
    tiles fitted to the map when ``fit_multiple`` (the model's size multiple) is given."""
    rows, cols = out_shape
    if rows < 1 or cols < 1:
        raise ValueError(f"output shape must be positive, got {out_shape}")
    core = tile_px - 2 * border_px
    if core < 1:
        raise ValueError(f"tile of {tile_px}px with a border of {border_px}px keeps nothing; "
                         f"use a tile larger than {2 * border_px}px")
    tiles = []
    for core_row in range(0, rows, core):
        core_h = min(core, rows - core_row)
        in_h = fitted_px(core_h, tile_px=tile_px, border_px=border_px, fit_multiple=fit_multiple)
        for core_col in range(0, cols, core):
            core_w = min(core, cols - core_col)
            tiles.append(Tile(out_row=core_row - border_px, out_col=core_col - border_px,
                              core_row=core_row, core_col=core_col, core_h=core_h, core_w=core_w,
                              in_h=in_h, in_w=fitted_px(core_w, tile_px=tile_px,
                                                        border_px=border_px,
                                                        fit_multiple=fit_multiple)))
    return tiles


def tiles_on_mask(tiles: list[Tile], mask: np.ndarray, *, out_shape: tuple[int, int]
                  ) -> list[Tile]:
    """Tiles whose core touches the mask; ``mask`` covers the same area as the output map at a
    coarser (any) resolution."""
    sr, sc = mask.shape[0] / out_shape[0], mask.shape[1] / out_shape[1]
    kept = []
    for t in tiles:
        r0, c0 = int(t.core_row * sr), int(t.core_col * sc)
        r1 = max(r0 + 1, int(np.ceil((t.core_row + t.core_h) * sr)))
        c1 = max(c0 + 1, int(np.ceil((t.core_col + t.core_w) * sc)))
        if mask[r0:r1, c0:c1].any():
            kept.append(t)
    return kept


def computed_px(tiles: list[Tile]) -> int:
    """Input pixels the model computes for ``tiles``."""
    return sum(t.in_h * t.in_w for t in tiles)


def computed_px_ratio(tiles: list[Tile], *, out_px: int) -> float:
    """Pixels the model computes per output pixel (>= 1; the cost of overlap)."""
    return computed_px(tiles) / max(1, out_px)


def largest_tile_px(border_px: int, *, multiple: int, cap_px: int = 2048) -> int:
    """The largest default tile: 1024 px, or more for a wide border, so that on a large slide
    the border costs at most about 30 % ((T / (T - 2b))² <= 1.3 for T >= 16.3 b), up to
    ``cap_px``: on the CPU the default model peaks at 1.1 GB on a 1024 px tile, 2.2 GB on
    1536 px and 3.7 GB on 2048 px (a smaller ``--tile-px`` where that memory is not there;
    on a GPU the batch shrinks as tiles grow)."""
    step = multiple * max(1, 128 // multiple)
    want = -(-int(16.3 * border_px) // step) * step
    return max(1024, min(cap_px, want))


def choose_tile_px(out_shape: tuple[int, int], mask: np.ndarray | None, *, border_px: int,
                   multiple: int, largest_px: int | None = None, smallest_px: int = 384,
                   fit_multiple: int = 0) -> int:
    """The tile size (a multiple of ``multiple``) that computes the fewest pixels for this slide.

    Per-pixel model cost is about the same from 384 to 2048 px tiles, so the total cost is
    the pixels of the tiles run (``fit_multiple``: with edge tiles fitted, as the run will
    have them): large tiles waste less on borders, but on thin tissue a smaller tile wastes
    less past the tissue. Candidates (up to ``largest_px``, default
    :func:`largest_tile_px`) are compared on the real grid and tissue mask; ties go to the
    larger tile (fewer model calls)."""
    if largest_px is None:
        largest_px = largest_tile_px(border_px, multiple=multiple)
    step = multiple * max(1, 128 // multiple)
    lo = max(step, -(-max(smallest_px, 2 * border_px + multiple) // step) * step)
    hi = max(lo, largest_px // step * step)
    best = (float("inf"), hi)
    for t in range(hi, lo - 1, -step):
        tiles = tile_grid(out_shape, tile_px=t, border_px=border_px, fit_multiple=fit_multiple)
        if mask is not None:
            tiles = tiles_on_mask(tiles, mask, out_shape=out_shape)
        cost = computed_px(tiles)
        if cost < best[0]:
            best = (cost, t)
    return best[1]
