"""Export the paper-size U-Net (width 32, depth 5, 13 classes; random He-initialised weights)
with a wsiseg contract, for timing the engine at the paper's cost per pixel:

    python benchmarks/make_paper_unet.py runs/bench/paper-unet.onnx

Its labels are meaningless; only its speed is of interest. Needs the training extra (torch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import torch
from wsiseg_train.unet import UNetConfig, build_model, count_parameters

from wsiseg.contract import PAPER_CLASSES, paper_contract, to_metadata


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = build_model(UNetConfig(n_classes=len(PAPER_CLASSES), width=32, depth=5)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    dyn = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (torch.zeros(1, 3, 128, 128, dtype=torch.uint8),), str(out),
                      dynamo=False, opset_version=18, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": dyn, "logits": dyn})
    proto = onnx.load(str(out))
    meta = to_metadata(paper_contract(name="paper-unet-random", version="0",
                                      training={"weights": "random (benchmark only)"}))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    print(f"{out}: {count_parameters(model):,} parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
