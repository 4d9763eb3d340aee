"""Export a checkpoint to ONNX with the model contract in its metadata, then check it.

The graph takes ``image`` uint8 ``[N, 3, H, W]`` (RGB 0-255; scaling and mean/std normalisation
happen inside) and gives ``logits`` float32 ``[N, C, H, W]``; N, H and W are dynamic (H and W
must be multiples of ``size_multiple``). The exporter is torch's TorchScript-based one
(``dynamo=False``, opset 18, ``dynamic_axes``): the dynamo exporter needs the onnxscript package,
which the training extra does not install. Every export is checked with ``onnx.checker`` and
run through the engine (``wsiseg.engine``, as inference runs it) against torch on random input
of two sizes; the largest absolute difference of the logits is reported and must stay below
``tolerance``. The decoder's nearest-neighbour upsampling + 3 x 3 convolution pairs are stored
folded into transposed convolutions (``wsiseg.graph.fold_upsampling``: the same logits, about
1.4x faster on the CPU); :func:`fold_model` does the same to a model exported before.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.context import ContextParams
from wsiseg.contract import PAPER_CLASSES, ModelContract, TissueClass, to_metadata
from wsiseg.files import atomic_path
from wsiseg.graph import fold_upsampling

from .border import apply_context
from .checkpoint import load as load_checkpoint
from .config import Config
from .model import model_from_checkpoint
from .unet import size_multiple

OPSET = 18
# Distinct colours for classes that neither the config nor the paper's list names.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
           (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0))


class ExportError(RuntimeError):
    """The exported model failed its checks."""


def class_colors(cfg: Config) -> list[TissueClass]:
    paper = {c.name: c.color for c in PAPER_CLASSES}
    out = []
    for i, name in enumerate(cfg.model.classes):
        color = cfg.model.colors.get(name) or paper.get(name) or PALETTE[i % len(PALETTE)]
        out.append(TissueClass(name, tuple(int(v) for v in color)))  # type: ignore[arg-type]
    return out


def training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the model was trained on and how well it validated (no local paths)."""
    cfg, state = ckpt["config"], ckpt["state"]
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    sets = [{"kind": s["kind"], "annotation": s["annotation"],
             "source": Path(s["index"]).name if s["index"] else
             f"{len(s['items'])} slides"} for s in cfg["data"]["sets"]]
    return {"sets": sets, "mpp": cfg["data"]["mpp"], "patch_px": cfg["data"]["patch_px"],
            "epochs": state["epoch"], "best_epoch": state["best_epoch"],
            "iterations": state["epoch"] * cfg["train"]["iterations"],
            "batch_size": cfg["train"]["batch_size"], "weighting": cfg["train"]["weighting"],
            "lr": cfg["train"]["lr"], "seed": cfg["train"]["seed"],
            "model": {**{k: cfg["model"][k] for k in ("width", "depth", "norm")},
                      "colour": cfg["model"].get("colour", "rgb")},
            "n_params": ckpt.get("n_params"),
            "val_dice": best.get("val_dice"),
            "val_dice_per_class": {k[5:]: v for k, v in best.items() if k.startswith("dice_")}}


def make_contract(cfg: Config, training: dict[str, Any]) -> ModelContract:
    m = cfg.model
    return ModelContract(
        name=m.name, version=m.version, mpp=cfg.data.mpp, tile_px=cfg.data.patch_px,
        border_px=m.border_px, size_multiple=size_multiple(m.depth),
        classes=tuple(class_colors(cfg)), tumour_classes=m.tumour_classes,
        stroma_classes=m.stroma_classes, background=m.background or None, input="uint8",
        output="logits", training=training)


def parity(model: torch.nn.Module, path: Path, sizes: list[tuple[int, int, int]],
           seed: int = 0) -> float:
    """Largest |engine - torch| over random uint8 inputs of the given (N, H, W) sizes; the
    exported file runs through :func:`wsiseg.engine.load_model` (CPU), as in inference."""
    from wsiseg.engine import ModelError, load_model

    try:
        engine = load_model(path, device="cpu", head="host")
    except ModelError as e:
        raise ExportError(f"the exported model fails the engine's checks: {e}") from None
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n, h, w in sizes:
        x = rng.integers(0, 256, size=(n, 3, h, w), dtype=np.uint8)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = engine.run(x.transpose(0, 2, 3, 1))
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output {got.shape} differs from torch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_onnx(checkpoint: str | Path, out: str | Path, *, tolerance: float = 1e-3,
                context: bool = True, context_params: ContextParams = ContextParams()) -> dict:
    """Export ``checkpoint`` (a .pt file or a run folder) to ``out``; returns a report.

    With ``context`` the contract's ``border_px`` is the model's measured effective context
    (``training/border.py``; the measurement is recorded in the contract's ``training``
    record), else the config's ``model.border_px``."""
    import onnx

    ckpt = load_checkpoint(checkpoint)
    cfg, model = model_from_checkpoint(ckpt)
    model.eval()
    contract = make_contract(cfg, training_summary(ckpt))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = contract.size_multiple
    side = max(2 * m, min(cfg.data.patch_px, 8 * m))
    example = torch.zeros(1, 3, side, side, dtype=torch.uint8)
    dyn = {0: "batch", 2: "height", 3: "width"}
    # Written, checked and given its border under a temporary name beside ``out``; moved into
    # place only when all of that succeeded (wsiseg.files.atomic_path).
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": dyn, "logits": dyn})
        proto = onnx.load(str(tmp))
        fold_upsampling(proto)
        proto.doc_string = (f"{contract.name} {contract.version}: U-Net, "
                            f"{contract.n_classes} classes")
        for key, value in to_metadata(contract).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        diff = parity(model, tmp, [(2, side, side), (1, side + m, 2 * m)])
        if not diff <= tolerance:
            raise ExportError(f"ONNX Runtime and torch differ by {diff:.3g} (> {tolerance})")
        if context:
            contract_dict = apply_context(tmp, params=context_params)["contract"]
        else:
            contract_dict = json.loads(json.dumps(contract.to_dict()))
    return {"path": str(out), "opset": OPSET, "exporter": "torchscript (dynamo=False)",
            "max_abs_diff": diff, "contract": contract_dict}


def fold_model(model: str | Path, out: str | Path, *, tolerance: float = 1e-3) -> dict:
    """Write ``model`` with its upsampling + convolution pairs folded (metadata kept) to
    ``out``, after running both through the engine on random input of two sizes; ValueError
    when ``model`` is not a model or has nothing to fold, ExportError when the two differ by
    more than ``tolerance``."""
    import onnx

    from wsiseg.engine import ModelError, load_model

    model, out = Path(model), Path(out)
    try:
        before = load_model(model, device="cpu")
    except ModelError as e:
        raise ValueError(str(e)) from None
    proto = onnx.load(str(model))
    n = fold_upsampling(proto)
    if n == 0:
        raise ValueError(f"{model.name}: no nearest-neighbour upsampling followed by a 3 x 3 "
                          "convolution to fold (already folded?)")
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        try:
            after = load_model(tmp, device="cpu")
        except ModelError as e:
            raise ExportError(f"the folded model fails the engine's checks: {e}") from None
        m = after.contract.size_multiple
        rng = np.random.default_rng(0)
        diff = 0.0
        for shape in ((1, 4 * m, 6 * m, 3), (2, 2 * m, 2 * m, 3)):
            x = rng.integers(0, 256, size=shape, dtype=np.uint8)
            diff = max(diff, float(np.abs(after.run(x) - before.run(x)).max()))
        if not diff <= tolerance:
            raise ExportError(f"the folded model differs from {model.name} by {diff:.3g} "
                              f"(> {tolerance}); not written")
    return {"path": str(out), "source": model.name, "folded": n, "max_abs_diff": diff}
