"""A model's effective context: how far from an output pixel its input still matters.

A tiled run gives an output pixel at least ``border_px`` of input on every side; beyond that,
the tile ends (the network pads) and another tile size ends elsewhere. If the pixel's label
depends on input farther away than the border, maps made with different tile sizes disagree
along tile edges: seams. The theoretical receptive field of a U-Net is hundreds of pixels; the
part that matters in practice is much smaller and is measured here, on real tissue, for any
ONNX model with the contract (only the engine's runner is used).

For output pixels at distance ``d`` (to ``d + step``) inside a window, two changes of the input
are made beyond ``d`` and the outputs compared with those of a larger reference window (with
``max_px`` of context; ``d`` goes up to ``max_px`` minus one step):

- ``cut``: the input ends at ``d`` (what a tile edge does);
- ``swap``: the input beyond ``d`` is replaced by other real tissue (another sampled window).

At each ``d`` the share of pixels whose label flips and the ``score_quantile`` of the largest
class-probability change are recorded; the effective context is the smallest ``d`` from which
on, for both changes, flips stay at most ``flip_tol`` and that probability change at most
``prob_tol``. Distances step by a multiple of the model's ``size_multiple`` (at least 8 px) so
that every window is aligned with the network's pooling grid, as tiles are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .engine import Model
from .slide import Slide
from .tissue import TissueParams, tissue_mask

DEFAULT_TISSUE = Path(__file__).resolve().parents[1] / "examples" / "ebhi-val-mosaic.tif"


class ContextError(ValueError):
    """The context cannot be measured as asked; the message says why."""


@dataclass(frozen=True)
class ContextParams:
    max_px: int = 160  # the reference window's context; distances up to max_px - step are tried
    window_px: int = 64  # side of the measured output window
    samples: int = 12  # windows on tissue
    # Defaults ask for no flipped label and a negligible score change: on the default model a
    # looser 0.01-0.1 % of flips still left a few changed pixels, all on tile-core edges.
    flip_tol: float = 0.0  # largest share of flipped labels
    prob_tol: float = 0.001  # largest probability change at the quantile below
    score_quantile: float = 0.999
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def distance_step(size_multiple: int) -> int:
    """Step between the distances tried: a multiple of ``size_multiple``, at least 8 px."""
    return size_multiple * max(1, -(-8 // size_multiple))


def probabilities(scores: np.ndarray, output: str) -> np.ndarray:
    """Class probabilities from model outputs (N, C, H, W)."""
    if output == "probabilities":
        return scores
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sample_windows(slide_path: str | Path, model: Model, *, side_px: int, samples: int,
                   seed: int = 0, mpp: float | None = None) -> np.ndarray:
    """``samples`` windows of ``side_px`` × ``side_px`` RGB read at the model's mpp, centred on
    tissue (tissue mask of the slide's thumbnail), inside the slide. Returns (N, side, side, 3)."""
    rng = np.random.default_rng(seed)
    with Slide(slide_path, mpp=mpp) as slide:
        plan = slide.plan(model.contract.mpp)
        w, h = slide.info.l0_size  # a thumbnail of at most ~4 Mpx, as segment_slide reads
        thumb, scanned, thumb_mpp = slide.thumbnail(
            max(8.0, (w * h / 4e6) ** 0.5 * slide.info.mpp))
        mask = tissue_mask(thumb, scanned, mpp=thumb_mpp, params=TissueParams(margin_um=0.0))
        rows, cols = plan.out_shape
        if rows < side_px or cols < side_px:
            raise ContextError(f"{Path(slide_path).name} is {rows} x {cols} px at "
                               f"{model.contract.mpp} um/px, smaller than the {side_px}px "
                               f"window the measurement needs; use a larger slide or --max-px")
        ys, xs = np.nonzero(mask)
        scale = plan.mpp / thumb_mpp  # thumbnail pixels per map pixel
        half = side_px // 2
        ok = ((ys + 0.5) / scale >= half) & ((ys + 0.5) / scale <= rows - half) & \
             ((xs + 0.5) / scale >= half) & ((xs + 0.5) / scale <= cols - half)
        if not ok.any():
            raise ContextError(f"{Path(slide_path).name}: no tissue at least {half}px from the "
                               f"slide's edge to measure the context on")
        pick = rng.choice(np.flatnonzero(ok), size=samples, replace=ok.sum() < samples)
        out = []
        for i in pick:
            r = min(rows - side_px, max(0, int((ys[i] + 0.5) / scale) - half))
            c = min(cols - side_px, max(0, int((xs[i] + 0.5) / scale) - half))
            out.append(slide.read(plan, r, c, side_px, side_px)[0])
    return np.stack(out)


def _ring(side: int, inner: int) -> np.ndarray:
    """Mask of a ``side`` square minus its centred ``inner`` square."""
    ring = np.ones((side, side), bool)
    o = (side - inner) // 2
    ring[o:o + inner, o:o + inner] = False
    return ring


def _change(ref: np.ndarray, got: np.ndarray, where: np.ndarray, q: float) -> tuple[float, float]:
    """(share of flipped labels, quantile q of max |probability change|) over ``where``."""
    flips = ref.argmax(axis=1) != got.argmax(axis=1)
    moved = np.abs(ref - got).max(axis=1)
    return float(flips[:, where].mean()), float(np.quantile(moved[:, where], q))


def _run(model: Model, x: np.ndarray) -> np.ndarray:
    return probabilities(model.run(x), model.contract.output)


def context_curve(model: Model, tissue: np.ndarray, params: ContextParams) -> list[dict]:
    """Flip share and probability change at each distance, for both changes (cut and swap).

    ``tissue`` holds (N, S, S, 3) windows with S = window_px + 2 * max_px."""
    p, step = params, distance_step(model.contract.size_multiple)
    n, side = tissue.shape[0], tissue.shape[1]
    if side != p.window_px + 2 * p.max_px:
        raise ContextError(f"tissue windows must be {p.window_px + 2 * p.max_px}px, got {side}")
    ref = _run(model, tissue)
    other = np.roll(tissue, 1, axis=0)  # the swap's far tissue: another window
    ring = _ring(p.window_px, p.window_px - 2 * step)  # pixels at distance d .. d + step
    rows = []
    for d in range(step, p.max_px, step):  # the reference itself has max_px
        o = p.max_px - d  # offset of the cut window inside the reference
        keep = slice(o, side - o)
        ref_w = ref[:, :, p.max_px:side - p.max_px, p.max_px:side - p.max_px]
        cut = _run(model, np.ascontiguousarray(tissue[:, keep, keep]))
        cut_w = cut[:, :, d:cut.shape[2] - d, d:cut.shape[3] - d]
        swapped = other.copy()
        swapped[:, keep, keep] = tissue[:, keep, keep]
        swap = _run(model, swapped)[:, :, p.max_px:side - p.max_px, p.max_px:side - p.max_px]
        cut_flips, cut_prob = _change(ref_w, cut_w, ring, p.score_quantile)
        swap_flips, swap_prob = _change(ref_w, swap, ring, p.score_quantile)
        rows.append({"distance_px": d, "cut_flips": cut_flips, "cut_prob": cut_prob,
                     "swap_flips": swap_flips, "swap_prob": swap_prob,
                     "pixels": int(n * ring.sum())})
    return rows


def passes(row: dict, params: ContextParams) -> bool:
    return (max(row["cut_flips"], row["swap_flips"]) <= params.flip_tol
            and max(row["cut_prob"], row["swap_prob"]) <= params.prob_tol)


def effective_context(curve: list[dict], params: ContextParams) -> int | None:
    """Smallest distance from which on every measured distance passes; None if none does."""
    best = None
    for row in reversed(curve):
        if not passes(row, params):
            break
        best = row["distance_px"]
    return best


def measure_context(model: Model, *, slide: str | Path | None = None, mpp: float | None = None,
                    params: ContextParams = ContextParams()) -> dict:
    """Measure ``model``'s effective context on real tissue (``slide``, default the demo
    mosaic in examples/). Returns a JSON-ready record; ``context_px`` is None when even
    ``max_px`` is not enough (measure again with a larger ``max_px``)."""
    m = distance_step(model.contract.size_multiple)
    if bad := [k for k in ("max_px", "window_px") if getattr(params, k) % m]:
        raise ContextError(f"{' and '.join(bad)} must be multiples of {m} (the model's "
                           f"size_multiple {model.contract.size_multiple}, at least 8)")
    if params.window_px < 2 * m or params.max_px < 2 * m or params.samples < 2:
        raise ContextError(f"window_px must be at least {2 * m}, max_px at least {2 * m} and "
                           f"samples at least 2 (the swap takes another window's tissue)")
    if slide is None and not DEFAULT_TISSUE.is_file():
        raise ContextError("the demo mosaic (examples/ebhi-val-mosaic.tif) is not beside this "
                           "installation; pass a slide with tissue to measure on")
    slide = Path(slide) if slide else DEFAULT_TISSUE
    tissue = sample_windows(slide, model, side_px=params.window_px + 2 * params.max_px,
                            samples=params.samples, seed=params.seed, mpp=mpp)
    curve = context_curve(model, tissue, params)
    return {"context_px": effective_context(curve, params), "tissue": slide.name,
            "model": f"{model.contract.name} v{model.contract.version}",
            "params": params.to_dict(), "curve": curve}
