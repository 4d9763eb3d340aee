"""Engine benchmark: model-only vs end-to-end throughput, and peak memory vs slide size.

    python benchmarks/bench_engine.py speed --model MODEL.onnx [--slide SLIDE] [--mpp 0.5]
    python benchmarks/bench_engine.py speed --model MODEL.onnx --synthetic-px 4096
    python benchmarks/bench_engine.py memory [--large-px 60000]
    python benchmarks/bench_engine.py reads [--slide SLIDE] [--target-mpp 1.0] [--tile-px 512]
    python benchmarks/bench_engine.py tile-sizes --model MODEL.onnx [OTHER.onnx] [--sizes 1920 3328]

``speed`` reads the tiles that ``wsiseg segment`` would run on a real slide, keeps them in
memory and times the model alone on them (model-only), then times ``segment_slide`` on the same
slide with the same options (end-to-end: reading, resampling, model, stitching, writing).
Both are reported in tissue Mpx/s (output pixels of the tiles' cores per second), with the
ratio end-to-end / model-only and the pixels computed per output pixel.

``memory`` builds synthetic pyramidal slides (a small one and a large one, tissue on a
fraction of the area), segments each in a fresh process with a tiny colour-rule model and
reports the peak resident memory of that process: the canvas is on disk, so the large slide
should need about as much memory as the small one.

``reads`` times reading the same tiles two ways on a slide whose factor to the target mpp is
near an integer k: as k x k block means (what the planner chooses) and through the general
resampler (Gaussian + bilinear), alternating rounds so that load on a shared machine hits both.

``tile-sizes`` weighs overlap against per-pixel speed: for each tile size, a fresh process
times the model on one tile of that size (after a small warm-up call) and reports its peak
resident memory; the pixels computed per output pixel on a large all-tissue slide come from
the engine's tile grid with the model's border, and their quotient is the output throughput a
large slide would get. Sizes (and models, when several are given: e.g. a model before and after
``wsiseg-train fold``) alternate over the rounds (reversed every other round).

Results go to stdout as JSON lines; benchmarks/RESULTS.md records runs with their machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"


def batches(pixels: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """Consecutive runs of at most ``size`` tiles of one shape (fitted edge tiles differ), as
    the engine batches them."""
    out: list[list[np.ndarray]] = []
    for p in pixels:
        if out and len(out[-1]) < size and out[-1][0].shape == p.shape:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def speed(args: argparse.Namespace) -> dict:
    from wsiseg.engine import load_model
    from wsiseg.pipeline import SegmentOptions, plan_tiles, segment_slide
    from wsiseg.slide import Slide

    model = load_model(args.model, device=args.device)
    opts = SegmentOptions(tile_px=args.tile_px, batch_size=args.batch_size, device=args.device,
                          mpp=args.mpp, workers=args.workers)
    batch = opts.batch_size or 1
    with Slide(args.slide, mpp=args.mpp) as s:
        tp = plan_tiles(s, model, opts)
        plan, tile_px, tiles = tp.plan, tp.tile_px, tp.tiles
        opts = dataclasses.replace(opts, tile_px=tile_px)  # the same tiles end to end
        t0 = time.perf_counter()
        pixels = [s.read(plan, t.out_row, t.out_col, t.in_h, t.in_w)[0] for t in tiles]
        read_s = time.perf_counter() - t0
    core_mpx = sum(t.core_h * t.core_w for t in tiles) / 1e6
    model.run(pixels[0][None])  # warm-up
    model_runs, reports = [], []
    for _ in range(args.rounds):  # alternating, so that load on a shared machine hits both
        t0 = time.perf_counter()
        for group in batches(pixels, batch):
            model.predict(np.stack(group))
        model_runs.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            reports.append(segment_slide(args.slide, Path(tmp) / "map.tif", model=model,
                                         options=opts))
    ratios = [m / r["timing"]["tiles_s"] for m, r in zip(model_runs, reports)]
    k = int(np.argsort(ratios)[len(ratios) // 2])  # the round with the median ratio
    model_s, report = model_runs[k], reports[k]
    t = report["timing"]
    return {
        "bench": "speed", "slide": Path(args.slide).name, "model": Path(args.model).name,
        "providers": model.providers, "tile_px": tile_px, "batch_size": batch,
        "workers": args.workers, "tiles": len(tiles), "tissue_mpx": round(core_mpx, 3),
        "computed_px_per_output_px": round(report["tiles"]["computed_px_per_output_px"], 3),
        "read_only_mpx_s": round(core_mpx / read_s, 3),
        "model_only_mpx_s": round(core_mpx / model_s, 4),
        "end_to_end_tiles_mpx_s": round(core_mpx / t["tiles_s"], 4),
        "end_to_end_total_mpx_s": round(core_mpx / t["total_s"], 4),
        "ratio_tiles": round(model_s / t["tiles_s"], 3),
        "ratio_total": round(model_s / t["total_s"], 3),
        "ratio_tiles_rounds": [round(r, 3) for r in ratios], "bound_by": t["bound_by"],
        "write_s": round(t["write_s"], 2), "machine": machine(),
    }


def reads(args: argparse.Namespace) -> dict:
    from wsiseg.slide import ReadPlan, Slide
    from wsiseg.tiling import tile_grid

    with Slide(args.slide, mpp=args.mpp) as s:
        box = s.plan(args.target_mpp)
        if box.box < 2:
            raise SystemExit(f"{args.slide}: no integer factor to {args.target_mpp} um/px "
                             f"(plan: {box.method})")
        want = args.target_mpp / s.info.mpp / s.info.level_downsamples[box.level]
        resample = ReadPlan(level=box.level, scale=want, mpp=args.target_mpp,
                            out_shape=box.out_shape)
        tiles = tile_grid(box.out_shape, tile_px=args.tile_px, border_px=32)
        secs = {"box": [], "resample": []}
        for _ in range(args.rounds):
            for name, plan in (("box", box), ("resample", resample)):
                t0 = time.perf_counter()
                for t in tiles:
                    s.read(plan, t.out_row, t.out_col, args.tile_px, args.tile_px)
                secs[name].append(time.perf_counter() - t0)
    per_tile = {k: 1e3 * min(v) / len(tiles) for k, v in secs.items()}
    return {"bench": "reads", "slide": Path(args.slide).name, "tile_px": args.tile_px,
            "tiles": len(tiles), "plan": box.method, "map_mpp": round(box.mpp, 4),
            "box_ms_per_tile": round(per_tile["box"], 1),
            "resample_ms_per_tile": round(per_tile["resample"], 1),
            "speed_up": round(per_tile["resample"] / per_tile["box"], 2), "machine": machine()}


def build_large_slide(path: Path, side_px: int, *, mpp: float, tissue_fraction: float) -> None:
    """A tiled pyramidal RGB TIFF of side_px², white with pink/purple stripes of tissue in a
    band covering ``tissue_fraction`` of the rows, written tile by tile (flat memory)."""
    import tifffile
    tile = 512
    band = (int(side_px * (0.5 - tissue_fraction / 2)), int(side_px * (0.5 + tissue_fraction / 2)))
    pink, purple = np.array([235, 140, 190], np.uint8), np.array([110, 60, 160], np.uint8)

    def tiles(side: int, scale: int):
        for r in range(0, side, tile):
            for c in range(0, side, tile):
                t = np.full((tile, tile, 3), 255, np.uint8)
                rows = (np.arange(r, r + tile) * scale)
                in_band = (rows >= band[0]) & (rows < band[1])
                cols = (np.arange(c, c + tile) * scale)
                stripe = ((cols // 300) % 2).astype(bool)
                t[in_band] = np.where(stripe[:, None], purple, pink)[None]
                yield t

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        side, scale, level = side_px, 1, 0
        while True:
            tw.write(tiles(side, scale), shape=(side, side, 3), dtype=np.uint8,
                     tile=(tile, tile), photometric="rgb", compression="zlib",
                     compressionargs={"level": 1}, subfiletype=1 if level else 0,
                     resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                     resolutionunit="CENTIMETER")
            if side <= 2048:
                break
            side, scale, level = -(-side // 2), scale * 2, level + 1


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from wsiseg.pipeline import SegmentOptions, segment_slide
t = time.perf_counter()
r = segment_slide({slide!r}, {out!r}, model={model!r}, options=SegmentOptions(tile_px=1024))
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t, "tiles": r["tiles"]["run"],
                  "map_shape": r["map"]["shape"]}}))
"""


def memory(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from onnx_models import colour_rule_model, contract

    from wsiseg.contract import to_metadata
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        model = colour_rule_model(tmp / "m.onnx", meta=to_metadata(
            contract(mpp=1.0, tile_px=256, border_px=16, size_multiple=16)))
        for side in (args.small_px, args.large_px):
            slide = tmp / f"synthetic-{side}.tif"
            t0 = time.perf_counter()
            build_large_slide(slide, side, mpp=1.0, tissue_fraction=args.tissue_fraction)
            build_s = time.perf_counter() - t0
            code = _CHILD.format(tests=str(ROOT / "tests"), slide=str(slide),
                                 out=str(tmp / f"map-{side}.tif"), model=str(model))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append({"bench": "memory", "side_px": side, "build_s": round(build_s, 1),
                            **{k: (round(v, 1) if isinstance(v, float) else v)
                               for k, v in r.items()}, "machine": machine()})
            slide.unlink()
    return results


_TILE_CHILD = """
import json, resource, sys, time
import numpy as np
from wsiseg.engine import load_model
m = load_model({model!r}, device={device!r})
t = {tile}
rng = np.random.default_rng(0)
m.predict(rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8))
x = rng.integers(0, 256, (1, t, t, 3), dtype=np.uint8)
t0 = time.perf_counter()
m.predict(x)
s = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({{"seconds": s, "peak_rss_gb": rss}}))
"""


def tile_sizes(args: argparse.Namespace) -> list[dict]:
    from wsiseg.engine import load_model
    from wsiseg.pipeline import fit_multiple
    from wsiseg.tiling import computed_px_ratio, tile_grid
    model = load_model(args.model[0], device=args.device)
    border = model.contract.border_px
    side = args.slide_px
    ratio = {t: computed_px_ratio(tile_grid((side, side), tile_px=t, border_px=border,
                                            fit_multiple=fit_multiple(model)),
                                  out_px=side * side) for t in args.sizes}
    pairs = [(m, t) for t in args.sizes for m in args.model]
    runs: dict[tuple[str, int], list[dict]] = {pair: [] for pair in pairs}
    for r in range(args.rounds):
        for m, t in (pairs if r % 2 == 0 else pairs[::-1]):
            code = _TILE_CHILD.format(model=str(m), device=args.device, tile=t)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True)
            runs[m, t].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = []
    for m, t in pairs:
        secs = sorted(x["seconds"] for x in runs[m, t])
        med = secs[len(secs) // 2]
        computed = t * t / med / 1e6
        results.append({"bench": "tile-sizes", "model": Path(m).name, "tile_px": t,
                        "border_px": border, "slide_px": side,
                        "computed_per_output": round(ratio[t], 3),
                        "seconds": [round(x, 1) for x in secs],
                        "computed_mpx_s": round(computed, 3),
                        "output_mpx_s": round(computed / ratio[t], 3),
                        "peak_rss_gb": round(max(x["peak_rss_gb"] for x in runs[m, t]), 2),
                        "machine": machine()})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--model", required=True)
    s.add_argument("--slide", default=str(SLIDES / "CMU-1-Small-Region.svs"))
    s.add_argument("--mpp", type=float)
    s.add_argument("--tile-px", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--rounds", type=int, default=1, help="alternating model-only/end-to-end")
    s.add_argument("--synthetic-px", type=int,
                   help="instead of --slide: a synthetic slide of this side at 1 um/px, all "
                        "tissue (benchmarks/gpu_check.py's)")
    m = sub.add_parser("memory")
    m.add_argument("--small-px", type=int, default=4096)
    m.add_argument("--large-px", type=int, default=60000)
    m.add_argument("--tissue-fraction", type=float, default=0.05)
    m.add_argument("--tmp", default=None, help="folder for the synthetic slides")
    r = sub.add_parser("reads")
    r.add_argument("--slide", default=str(SLIDES / "CMU-1-Small-Region.svs"))
    r.add_argument("--mpp", type=float)
    r.add_argument("--target-mpp", type=float, default=1.0)
    r.add_argument("--tile-px", type=int, default=512)
    r.add_argument("--rounds", type=int, default=5)
    z = sub.add_parser("tile-sizes")
    z.add_argument("--model", required=True, nargs="+",
                   help="one or more models (same border), alternated with the sizes")
    z.add_argument("--sizes", type=int, nargs="+", default=[1024, 1920, 2560, 3328])
    z.add_argument("--slide-px", type=int, default=20000,
                   help="side of the all-tissue slide whose grid gives the overlap cost")
    z.add_argument("--device", default="cpu")
    z.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if getattr(args, "synthetic_px", None):
        from gpu_check import synthetic_slide
        with tempfile.TemporaryDirectory() as tmp:
            args.slide = str(synthetic_slide(Path(tmp) / f"synthetic-{args.synthetic_px}.tif",
                                             args.synthetic_px))
            res = speed(args)
    else:
        res = {"speed": speed, "memory": memory, "reads": reads,
               "tile-sizes": tile_sizes}[args.cmd](args)
    for r in res if isinstance(res, list) else [res]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
