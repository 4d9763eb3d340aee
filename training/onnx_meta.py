"""Rewrite an ONNX model's metadata_props (the wsiseg contract) without touching its graph."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx

from wsiseg.files import atomic_path


def save_with_metadata(proto: onnx.ModelProto, meta: Mapping[str, str], out: str | Path) -> None:
    """Replace ``proto``'s metadata_props by ``meta`` and save it to ``out`` atomically (a
    temporary file beside it, moved into place; nothing is left behind on failure)."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
