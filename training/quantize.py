"""Low-precision twins of an exported model: static int8 (QDQ) for the CPU, fp16 for CUDA.

``quantize_int8`` works from an ONNX file, so the twin can be rebuilt whenever the default model
is re-exported: it calibrates ONNX Runtime's static quantiser (QDQ format, per-channel int8
weights, uint8 activations) on real training tiles of the model's data — evenly spaced rows of
the *train* split of the config's image/mask pair sets, read at the model's mpp; never the
validation rows and never a check set. Nodes named in ``exclude`` stay in fp32. The twin keeps
the model's contract with ``wsiseg.precision = "int8"``.

``convert_fp16`` stores weights and activations in float16 with float32 input/output types kept
(uint8 input and float32 logits, as the contract says), for the CUDA and TensorRT providers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from wsiseg.contract import PREFIX, from_metadata
from wsiseg.files import atomic_path

from .config import Config, ConfigError
from .data import read_pairs_csv, rescale_rgb


def calibration_tiles(cfg: Config, n_images: int, multiple: int, *, colour_copies: int = 0,
                      seed: int = 0) -> list[np.ndarray]:
    """``n_images`` evenly spaced train-split images of the config's pair sets, uint8 RGB at the
    model's mpp, cropped to a multiple of ``multiple``; each followed by ``colour_copies``
    copies under the config's own colour augmentation (what the model saw in training), so that
    the activation ranges also cover stains unlike the training lab's."""
    from skimage.io import imread

    from .augment import photometric

    rows: list[tuple[Path, float]] = []
    for s in cfg.data.sets:
        if s.kind != "pairs" or not s.index:
            continue
        table = read_pairs_csv(s.index, image_column=s.image_column, mask_column=s.mask_column)
        if s.split_column:
            table = [r for r in table if r.get(s.split_column) == "train"]
        scale = (s.image_mpp / cfg.data.mpp) if s.image_mpp else 1.0
        rows += [(Path(s.index).parent / r[s.image_column], scale) for r in table]
    if not rows:
        raise ConfigError("quantize: the config has no image/mask pair set with train rows to "
                          "calibrate on; add a [[data.sets]] of kind \"pairs\"")
    pick = np.linspace(0, len(rows) - 1, min(n_images, len(rows))).round().astype(int)
    rng = np.random.default_rng(seed)
    tiles = []
    for i in dict.fromkeys(pick.tolist()):
        path, scale = rows[i]
        rgb = imread(path)[..., :3]
        if scale != 1.0:
            rgb = rescale_rgb(rgb, scale)
        h, w = rgb.shape[0] // multiple * multiple, rgb.shape[1] // multiple * multiple
        if h and w:
            tiles.append(np.ascontiguousarray(rgb[:h, :w]))
            tiles += [photometric(tiles[-1], cfg.augment, rng) for _ in range(colour_copies)]
    return tiles


def _retag(path: Path, source_meta: dict[str, str], precision: str, notes: dict) -> None:
    """Copy the source's contract into ``path`` with ``precision`` and a note in training."""
    import json

    import onnx

    proto = onnx.load(str(path))
    meta = dict(source_meta)
    meta[PREFIX + "precision"] = precision
    training = json.loads(meta.get(PREFIX + "training", "{}"))
    training[precision] = notes
    meta[PREFIX + "training"] = json.dumps(training)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    from_metadata(meta)  # the twin's contract must still parse
    onnx.save(proto, str(path))


def _source(model: Path) -> tuple[dict[str, str], object]:
    import onnx

    if not model.is_file():
        raise FileNotFoundError(f"model {model} not found")
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props}
    contract = from_metadata(meta)
    if contract.precision != "fp32":
        raise ValueError(f"{model.name} is already {contract.precision}; convert the fp32 model")
    return meta, contract


def head_node(model: str | Path) -> str:
    """Name of the node that writes the graph's output (the 1x1 logits convolution of the
    U-Net): quantising it would round the logits themselves to 256 steps."""
    import onnx

    proto = onnx.load(str(model))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        if out in node.output:
            return node.name
    raise ValueError(f"{Path(model).name}: no node writes the output {out!r}")


def full_resolution_convs(model: str | Path) -> list[str]:
    """Convolutions that run at the input's resolution: those before the graph's first
    MaxPool and from its last upsampling on (a Resize, or a transposed convolution when the
    decoder is folded): the U-Net's first and last level, and the head."""
    import onnx

    nodes = onnx.load(str(model)).graph.node
    ops = [n.op_type for n in nodes]
    first_pool = ops.index("MaxPool") if "MaxPool" in ops else len(ops)
    ups = [i for i, op in enumerate(ops) if op in ("Resize", "ConvTranspose")]
    last_up = ups[-1] if ups else len(ops)
    return [n.name for i, n in enumerate(nodes) if n.op_type in ("Conv", "ConvTranspose")
            and (i < first_pool or i >= last_up)]


def quantize_int8(model: str | Path, cfg: Config, out: str | Path, *, n_images: int = 64,
                  exclude: tuple[str, ...] = (), method: str = "minmax",
                  colour_copies: int = 0) -> dict:
    """Write the static int8 (QDQ, per-channel weights) twin of ``model`` to ``out``."""
    import onnx

    from wsiseg.engine import CALIBRATION_METHODS, calibration_reader, quantize_static_int8

    model, out = Path(model), Path(out)
    meta, contract = _source(model)
    if contract.input != "uint8":
        raise ValueError(f"{model.name}: int8 calibration feeds uint8 tiles; the model takes "
                         f"{contract.input}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {method!r}")
    tiles = calibration_tiles(cfg, n_images, contract.size_multiple,
                              colour_copies=colour_copies)
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".wsiseg-q-") as tmp:
        q = Path(tmp) / "q.onnx"
        quantize_static_int8(model, q, calibration_reader(tiles, input_name), method=method,
                             exclude=exclude, workdir=tmp)
        n_real = len(tiles) // (1 + colour_copies)
        copies = f", each with {colour_copies} colour-augmented copies" if colour_copies else ""
        notes = {"calibration": f"{n_real} train-split images of the config's pair sets at "
                                f"{cfg.data.mpp} um/px{copies}", "method": method,
                 "format": "QDQ, per-channel int8 weights, uint8 activations",
                 "fp32_nodes": list(exclude)}
        _retag(q, meta, "int8", notes)
        os.replace(q, out)
    return {"path": str(out), "source": model.name, "precision": "int8", **notes,
            "bytes": out.stat().st_size}


def convert_fp16(model: str | Path, out: str | Path) -> dict:
    """Write the float16 twin of ``model`` (input and output types kept) to ``out``."""
    import onnx

    from wsiseg.engine import float16_model

    model, out = Path(model), Path(out)
    meta, _ = _source(model)
    proto = float16_model(onnx.load(str(model)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        _retag(tmp, meta, "fp16", {"format": "float16 weights and activations, fp32 I/O kept"})
    return {"path": str(out), "source": model.name, "precision": "fp16",
            "bytes": out.stat().st_size}
