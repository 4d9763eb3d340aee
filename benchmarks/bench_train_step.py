"""Training step time with the decoder's upsampling + 3x3 convolution folded or plain.

    pip install -e '.[train]'
    python benchmarks/bench_train_step.py [--config training/configs/default-model.toml]

Builds the config's U-Net (random weights) and times forward + backward of a batch of random
patches of the config's size (``train.batch_size`` x ``data.patch_px``), alternating
``UNet.fold`` on and off over the rounds so that load on a shared machine hits both; the
median seconds per step and their ratio go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from bench_engine import machine
    from wsiseg_train.config import load_config
    from wsiseg_train.model import make_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "training/configs/default-model.toml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round and variant")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model = make_model(cfg).train()
    n, px = cfg.train.batch_size, cfg.data.patch_px
    x = torch.rand(n, 3, px, px) * 255
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds + 1):
        for fold in ((True, False) if r % 2 == 0 else (False, True)):
            model.net.fold = fold
            t = time.perf_counter()
            for _ in range(args.steps):
                model.zero_grad()
                model(x).square().mean().backward()
            if r:   # the first round warms both up
                times[fold].append((time.perf_counter() - t) / args.steps)
    plain, folded = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"bench": "train-step", "config": args.config.name, "batch": [n, 3, px, px],
                      "plain_s": round(plain, 3), "folded_s": round(folded, 3),
                      "speedup": round(plain / folded, 2), "threads": args.threads,
                      "torch": torch.__version__, "machine": machine()}))


if __name__ == "__main__":
    main()
