"""The GPU checks behind benchmarks/gpu_check.sh, one step per subcommand, results as JSON files.

    python benchmarks/gpu_check.py inference --out DIR [--dry-run] [--side-px 20000]
    python benchmarks/gpu_check.py train --out DIR [--dry-run] [--seconds 120]
    python benchmarks/gpu_check.py table --out DIR

``inference`` (in an environment with onnxruntime-gpu): label agreement of CUDA fp32 and fp16
against the CPU fp32 map on CMU-1 and the demo slide, then a large synthetic slide (all tissue,
1 um/px) timed end to end (segment_slide, labels decided on the GPU) and model-only (the same
number of tiles, pixels already in memory), with GPU utilisation sampled by nvidia-smi.
``train`` (in an environment with CUDA torch): a short ``wsiseg-train train`` on CUDA with
bf16 autocast. ``table`` prints every result as one table. ``--dry-run`` runs the same code on
the CPU at small sizes (the "GPU" is the CPU provider with the labels decided in the graph), so
that a typo costs CI a minute rather than a GPU lease.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
SLIDES = {"CMU-1": ROOT / "examples" / "CMU-1-Small-Region.svs",
          "demo": ROOT / "examples" / "ebhi-val-mosaic.tif"}
DRY_SLIDES = ("demo",)  # the dry run checks the code path, on one slide
TARGETS = {"fp32": 0.999, "fp16": 0.99}


def gpu_device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _segment(slide: Path, model, out: Path, **opts) -> tuple[np.ndarray, dict]:
    import tifffile

    from wsiseg.pipeline import SegmentOptions, segment_slide

    report = segment_slide(slide, out, model=model, options=SegmentOptions(**opts), analysis=None,
                           overwrite=True)
    return tifffile.imread(out, key=0), report


def fp16_twin(out: Path) -> Path:
    """The default model's fp16 twin, made in ``out`` (the repository ships none)."""
    from wsiseg_train.quantize import convert_fp16

    from wsiseg.contract import twin_path

    path = out / twin_path(MODEL, "fp16").name
    if not path.is_file():
        convert_fp16(MODEL, path)
    return path


def agreement(out: Path, dry: bool) -> list[dict]:
    """CUDA fp32/fp16 labels vs CPU fp32 labels on the real slides."""
    from wsiseg.engine import load_model

    cpu = load_model(MODEL, device="cpu", head="host")
    fp16 = fp16_twin(out)
    slides = {k: v for k, v in SLIDES.items() if not dry or k in DRY_SLIDES}
    refs = {name: _segment(slide, cpu, out / f"{name}.cpu.tif", device="cpu")[0]
            for name, slide in slides.items()}
    rows = []
    for precision, path in (("fp32", MODEL), ("fp16", fp16)):
        gpu = load_model(path, device=gpu_device(dry), head="graph")
        for name, slide in slides.items():
            ref = refs[name]
            got, rep = _segment(slide, gpu, out / f"{name}.{precision}.tif",
                                device=gpu_device(dry))
            rows.append({"check": f"agreement {precision} {name}",
                         "value": float((ref == got).mean()), "target": TARGETS[precision],
                         "providers": rep["model"]["providers"][0]})
    return rows


def synthetic_slide(path: Path, side_px: int, seed: int = 0) -> Path:
    """A ``side_px`` square pyramidal TIFF at 1 um/px, tissue everywhere: a 1024 px texture of
    purple nuclei on pink repeated, zlib level 1 (decoding costs like a real slide's)."""
    import tifffile
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    period = 1024
    field = gaussian_filter(rng.normal(size=(period, period)), 3, mode="wrap")
    nuclei = (field > np.quantile(field, 0.8))[..., None]
    tex = np.where(nuclei, [110, 60, 160], [235, 150, 190]).astype(np.float32)
    tex = np.clip(tex + rng.normal(0, 8, tex.shape), 0, 255).astype(np.uint8)
    levels = [tex]
    while side_px >> len(levels) >= 512 and len(levels) < 6:
        prev = levels[-1].astype(np.uint16)
        levels.append(((prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2]
                        + prev[1::2, 1::2] + 2) // 4).astype(np.uint8))

    def tiles(texture: np.ndarray, side: int):
        p = texture.shape[0]
        for r in range(0, side, 256):
            for c in range(0, side, 256):
                yield np.take(np.take(texture, np.arange(r, r + 256) % p, axis=0),
                              np.arange(c, c + 256) % p, axis=1)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, texture in enumerate(levels):
            side = side_px >> k
            tw.write(tiles(texture, side), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256),
                     photometric="rgb", compression="zlib", compressionargs={"level": 1},
                     subfiletype=1 if k else 0,
                     resolution=(1e4 / 2 ** k, 1e4 / 2 ** k), resolutionunit="CENTIMETER",
                     metadata=None, maxworkers=8)
    return path


class GpuSampler:
    """nvidia-smi utilisation samples every 200 ms while in the with-block (none on a CPU)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.proc, self.samples = enabled, None, []

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            text, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in text.split() if v.strip().isdigit()]

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"mean {np.mean(self.samples):.0f} %, max {max(self.samples):.0f} %"


def speed(out: Path, side_px: int, dry: bool) -> list[dict]:
    """End to end vs model-only on the synthetic slide, fp32 and fp16, labels on the GPU."""
    from wsiseg.engine import load_model
    from wsiseg.pipeline import SegmentOptions, plan_tiles
    from wsiseg.slide import Slide

    slide = synthetic_slide(out / "synthetic.tif", side_px)
    rows = []
    for precision, path in (("fp32", MODEL), ("fp16", fp16_twin(out))):
        model = load_model(path, device=gpu_device(dry), head="graph")
        with GpuSampler(not dry) as gpu:
            _, rep = _segment(slide, model, out / f"synthetic.{precision}.tif",
                              device=gpu_device(dry))
        t = rep["timing"]
        with Slide(slide) as s:
            tp = plan_tiles(s, model, SegmentOptions(tile_px=rep["parameters"]["tile_px"]))
            batch_size = rep["parameters"]["batch_size"]
            shape = (tp.tiles[0].in_h, tp.tiles[0].in_w)  # one batch of one shape, repeated
            pixels = np.stack([s.read(tp.plan, x.out_row, x.out_col, *shape)[0]
                               for x in tp.tiles if (x.in_h, x.in_w) == shape][:batch_size])
        model.predict(pixels)  # warm-up (TensorRT/CUDA kernels)
        n_calls = -(-len(tp.tiles) // batch_size)
        t0 = time.perf_counter()
        for _ in range(n_calls):
            model.predict(pixels)
        model_s = time.perf_counter() - t0
        out_mpx = side_px * side_px / 1e6
        rows += [
            {"check": f"synthetic end-to-end {precision}", "value": out_mpx / t["total_s"],
             "unit": "Mpx/s", "detail": f"{side_px}px, {len(tp.tiles)} tiles of {tp.tile_px}, "
             f"batch {batch_size}, bound by {t['bound_by']} (reader "
             f"{t['reader_mpx_per_s']:.1f}, model {t['model_mpx_per_s']:.1f} Mpx/s), "
             f"computed/output {rep['tiles']['computed_px_per_output_px']:.3f}, "
             f"GPU {gpu.summary()}"},
            {"check": f"synthetic model-only {precision}", "value": out_mpx / model_s,
             "unit": "Mpx/s", "detail": f"end-to-end / model-only "
             f"{model_s / t['total_s']:.2f}"}]
    return rows


def train_smoke(out: Path, seconds: int, dry: bool) -> list[dict]:
    """``wsiseg-train train`` of the default config on CUDA with bf16 autocast, stopped after
    ``seconds``; EBHI-Seg crops when present beside the checkout, else synthetic pairs."""
    cfg = out / "smoke.toml"
    text = (ROOT / "training" / "configs" / "default-model.toml").read_text()
    index = ROOT.parent / "shared" / "data" / "ebhi-seg" / "index.csv"
    if not index.is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from train_helpers import write_pairs
        index = write_pairs(out / "pairs", n_train=16, n_val=4, size=224)
    text = text.replace('index = "../../../shared/data/ebhi-seg/index.csv"',
                        f'index = "{index.as_posix()}"\nlimit = {8 if dry else 64}')
    cfg.write_text(text)
    device, iters, epochs = ("cpu", 2, 1) if dry else ("cuda", 200, 1000)
    cmd = [sys.executable, "-c", "from wsiseg_train.cli import main; main()", "train", str(cfg),
           "-o", str(out / "run"),
           "--set", f"train.device={device}", "--set", "train.amp=true", "--set",
           f"train.iterations={iters}", "--set", f"train.epochs={epochs}", "--set",
           "train.export=false", "--set", "data.val_patches=8"]
    t0 = time.perf_counter()
    try:  # on the GPU the run is stopped after ``seconds``: the epochs done by then count
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=None if dry else seconds)
        ok, tail = done.returncode == 0, done.stderr[-300:]
    except subprocess.TimeoutExpired as e:
        err = e.stderr or b""
        ok, tail = True, (err if isinstance(err, str) else err.decode(errors="replace"))[-300:]
    metrics = out / "run" / "metrics.csv"
    done_epochs = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0
    return [{"check": "train smoke", "value": done_epochs, "unit": "epochs",
             "ok": ok and done_epochs > 0,
             "detail": f"{device}, bf16 autocast, {iters} it/epoch, "
                       f"{time.perf_counter() - t0:.0f} s; "
                       f"{tail.splitlines()[-1] if tail else ''}"}]


def passed(row: dict) -> bool:
    if "ok" in row:
        return bool(row["ok"])
    return row["value"] >= row["target"] if "target" in row else True


def table(out: Path) -> int:
    rows = [r for f in sorted(out.glob("result-*.json")) for r in json.loads(f.read_text())]
    print(f"{'check':<32} {'value':>10} {'target':>8}  result  detail")
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], float) else str(r["value"])
        target = f">= {r['target']}" if "target" in r else ""
        print(f"{r['check']:<32} {value:>10} {target:>8}  {'ok  ' if passed(r) else 'FAIL'}"
              f"    {r.get('unit', '')} {r.get('detail', r.get('providers', ''))}")
    return 0 if rows and all(passed(r) for r in rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["inference", "train", "table"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes")
    p.add_argument("--side-px", type=int, default=20000, help="synthetic slide side")
    p.add_argument("--seconds", type=int, default=120, help="train smoke length on the GPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "table":
        return table(args.out)
    if args.step == "train":
        rows = train_smoke(args.out, args.seconds, args.dry_run)
    else:
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls") and not args.dry_run:
            ort.preload_dlls()  # the CUDA/cuDNN libraries of the nvidia-* wheels
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            side = 1024 if args.dry_run else args.side_px
            rows = agreement(Path(tmp), args.dry_run) + speed(Path(tmp), side, args.dry_run)
    (args.out / f"result-{args.step}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
