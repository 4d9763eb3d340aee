"""wsiseg against the MONAI way of doing the same job, on the same slide with the same weights.

    pip install -e '.[train,bench]'
    python benchmarks/bench_peer.py [--slide SLIDE] [--rounds 3]

The network: the default model's ONNX weights loaded into ``training/unet.py``'s U-Net (batch
norm is folded into the convolutions in the ONNX graph, so the torch twin is built without
normalisation layers; every convolution is matched by execution order and its shape checked,
and the twin's logits are compared with ONNX Runtime's before timing).

The peer pipeline, as MONAI's whole-slide tutorials do it: OpenSlide reads the slide's level 0,
MONAI's ``Resize`` (area) brings it to the model's 1 um/px, and ``sliding_window_inference``
runs the torch model on 384 px windows with overlap 0.25 and Gaussian blending, in
channels-last memory format under ``torch.inference_mode``; then argmax. No tissue mask, no
file written.

wsiseg: ``segment_slide`` end to end (thumbnail, tissue mask, reader threads, ONNX Runtime, label
map written as a pyramidal TIFF; no TSR/GeoJSON/preview) with the fp32 model and its int8
twin. Rounds alternate the three, so load on a shared machine hits all of them; the medians
and the ratios go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
SLIDE = ROOT / "examples" / "CMU-1-Small-Region.svs"


def torch_twin(onnx_path: Path):
    """training/unet.py's model with the ONNX file's weights; (model, contract)."""
    import onnx
    import torch
    from wsiseg_train.unet import UNetConfig, build_model

    from wsiseg.contract import from_metadata
    from wsiseg.graph import unfolded_initializers

    proto = onnx.load(str(onnx_path))
    contract = from_metadata({p.key: p.value for p in proto.metadata_props})
    init = unfolded_initializers(proto.graph)   # folded decoder weights back to 3 x 3
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    training = contract.training.get("model", {})
    cfg = UNetConfig(n_classes=contract.n_classes, width=int(training.get("width", 16)),
                     depth=int(training.get("depth", 5)), norm="none")
    mean = tuple(float(v) / 255 for v in init["mean"].ravel())
    std = tuple(float(v) / 255 for v in init["std"].ravel())
    model = build_model(cfg, mean, std).eval()
    model.net.fold = False   # the plain U-Net a lab's own loop would run (upsample, then conv)
    order: list[torch.nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(mod))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 2 ** cfg.depth, 2 ** cfg.depth))
    for h in hooks:
        h.remove()
    if len(order) != len(convs):
        raise SystemExit(f"{len(convs)} ONNX convolutions but {len(order)} in the torch U-Net")
    with torch.no_grad():
        for conv, node in zip(order, convs):
            w, b = np.array(init[node.input[1]]), np.array(init[node.input[2]])
            if tuple(conv.weight.shape) != w.shape:
                raise SystemExit(f"{node.name}: ONNX weight {w.shape} vs torch "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(b))
    return model, contract


def check_twin(model, onnx_path: Path) -> float:
    """Largest |torch - ONNX Runtime| of the logits on a random 256 px tile."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).integers(0, 256, (1, 3, 256, 256), dtype=np.uint8)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    with torch.inference_mode():
        got = model(torch.from_numpy(x).float()).numpy()
    return float(np.abs(got - ref).max())


def monai_run(slide_path: Path, model, mpp: float) -> dict:
    """OpenSlide read + MONAI Resize + sliding_window_inference (384, 0.25, gaussian)."""
    import openslide
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Resize

    t0 = time.perf_counter()
    with openslide.OpenSlide(str(slide_path)) as s:
        w, h = s.dimensions
        rgb = np.array(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
        slide_mpp = float(s.properties["openslide.mpp-x"])
    size = (round(h * slide_mpp / mpp), round(w * slide_mpp / mpp))
    x = Resize(size, mode="area")(torch.from_numpy(rgb).permute(2, 0, 1).float())
    x = x[None].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=(384, 384), sw_batch_size=1,
                                          predictor=model, overlap=0.25, mode="gaussian")
    labels = logits[0].argmax(0).to(torch.uint8).numpy() + 1
    return {"total_s": time.perf_counter() - t0, "labels": labels}


def wsiseg_run(slide_path: Path, model, tmp: Path) -> dict:
    import tifffile

    from wsiseg.pipeline import SegmentOptions, segment_slide

    out = tmp / "map.tif"
    t0 = time.perf_counter()
    report = segment_slide(slide_path, out, model=model, options=SegmentOptions(device="cpu"),
                           analysis=None, overwrite=True)
    total = time.perf_counter() - t0
    return {"total_s": total, "tiles_s": report["timing"]["tiles_s"],
            "labels": tifffile.imread(out, key=0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, default=SLIDE)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()
    import monai
    import torch
    from bench_engine import machine

    from wsiseg.contract import twin_path
    from wsiseg.engine import load_model

    torch.set_num_threads(args.threads)
    twin, contract = torch_twin(args.model)
    twin = twin.to(memory_format=torch.channels_last)
    diff = check_twin(twin, args.model)
    models = {"fp32": load_model(args.model, device="cpu"),
              "int8": load_model(twin_path(args.model, "int8"), device="cpu")}
    times: dict[str, list[float]] = {"monai": [], "wsiseg fp32": [], "wsiseg int8": []}
    labels = {}
    with tempfile.TemporaryDirectory() as tmp:
        wsiseg_run(args.slide, models["fp32"], Path(tmp))  # warm-up (OS cache, sessions)
        for _ in range(args.rounds):
            r = monai_run(args.slide, twin, contract.mpp)
            times["monai"].append(r["total_s"])
            labels["monai"] = r["labels"]
            for k, m in models.items():
                r = wsiseg_run(args.slide, m, Path(tmp))
                times[f"wsiseg {k}"].append(r["total_s"])
                labels[k] = r["labels"]
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = labels["monai"], labels["fp32"]
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    tissue = b[:h, :w] != contract.background_value
    print(json.dumps({
        "slide": args.slide.name, "map_px": list(b.shape), "machine": machine(),
        "torch": torch.__version__, "monai": monai.__version__, "torch_threads": args.threads,
        "twin_max_abs_diff": diff, "median_s": med, "rounds": times,
        "speedup_fp32": med["monai"] / med["wsiseg fp32"],
        "speedup_int8": med["monai"] / med["wsiseg int8"],
        "label_agreement_monai_vs_fp32_on_tissue": float((a[:h, :w] == b[:h, :w])[tissue].mean()),
    }))


if __name__ == "__main__":
    main()
