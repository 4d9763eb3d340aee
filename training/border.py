"""Set a model's ``border_px`` from its measured effective context (``wsiseg.context``).

``wsiseg-train context MODEL.onnx`` prints the measurement; with ``--apply`` the border is
written into the model's contract (``wsiseg.border_px``, and ``wsiseg.tile_px`` raised when the
old tile would keep nothing), the measurement is recorded under ``context`` in the contract's
``training`` record, and the file is replaced atomically. Only the metadata changes: the graph
and its weights are copied as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from wsiseg.context import ContextError, ContextParams, measure_context
from wsiseg.contract import PREFIX, ContractError, from_metadata
from wsiseg.engine import fixed_tile_px, load_model

from .onnx_meta import save_with_metadata


def border_for(context_px: int | None, *, max_px: int) -> int:
    """The border to discard for a measured context (it is already a multiple of the model's
    size_multiple, which keeps tile cores aligned with the pooling grid)."""
    if context_px is None:
        raise ContextError(f"the model's output still changes with input beyond the distances "
                           f"tried (below {max_px}px); measure again with a larger --max-px")
    return context_px


def smallest_tile_px(border_px: int, multiple: int, at_least: int) -> int:
    """Smallest tile, a multiple of ``multiple``, that keeps a core after the border."""
    need = max(at_least, 2 * border_px + multiple)
    return -(-need // multiple) * multiple


def set_border(path: str | Path, border_px: int, *, record: dict[str, Any] | None = None,
               out: str | Path | None = None) -> dict[str, Any]:
    """Write ``border_px`` (and ``record`` as ``training.context``) into the contract of the
    ONNX model at ``path``; saved to ``out`` (default: ``path`` itself, replaced atomically).
    Returns the new contract as a dict."""
    path, out = Path(path), Path(out or path)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        c = from_metadata(meta)
    except ContractError as e:
        raise ContextError(f"{path.name}: {e}") from None
    fixed = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]
             if d.HasField("dim_value")]
    tile_px = smallest_tile_px(border_px, c.size_multiple, c.tile_px)
    if fixed and 2 * border_px >= fixed[0]:
        raise ContextError(f"{path.name} takes {fixed[0]}px tiles only, which a border of "
                           f"{border_px}px leaves empty")
    training = dict(c.training)
    if record is not None:
        training["context"] = record
    meta[PREFIX + "border_px"] = str(border_px)
    meta[PREFIX + "tile_px"] = str(fixed[0] if fixed else tile_px)
    meta[PREFIX + "training"] = json.dumps(training)
    new = from_metadata(meta)  # validates the result before anything is written
    save_with_metadata(proto, meta, out)
    return new.to_dict()


def measure(path: str | Path, *, slide: str | Path | None = None, mpp: float | None = None,
            params: ContextParams = ContextParams()) -> dict[str, Any]:
    """Measure the effective context of the ONNX model at ``path`` (on the CPU)."""
    model = load_model(path, device="cpu")
    if fixed_tile_px(model):
        raise ContextError(f"{Path(path).name} takes fixed-size tiles; the context can only be "
                           f"measured on a model that accepts any multiple of its size_multiple")
    return measure_context(model, slide=slide, mpp=mpp, params=params)


def apply_context(path: str | Path, *, out: str | Path | None = None,
                  slide: str | Path | None = None, mpp: float | None = None,
                  params: ContextParams = ContextParams()) -> dict[str, Any]:
    """Measure the model's context and write the border it needs into the model."""
    result = measure(path, slide=slide, mpp=mpp, params=params)
    border = border_for(result["context_px"], max_px=params.max_px)
    record = {k: v for k, v in result.items() if k != "model"}
    contract = set_border(path, border, record=record, out=out)
    return {**result, "border_px": border, "tile_px": contract["tile_px"],
            "path": str(out or path), "contract": contract}
