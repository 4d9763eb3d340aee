"""Tiny hand-built ONNX models whose answers are known, for engine tests (no torch needed).

- ``colour_rule_model``: per-pixel linear scores of RGB (a 1x1 convolution), so the expected
  label of every pixel can be computed in numpy with ``colour_rule_labels``.
- ``box_filter_model``: ``depth`` stacked 3x3 convolutions (receptive field radius = depth),
  so a tiled run with ``border_px >= depth`` must equal a whole-region run exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wsiseg.contract import ModelContract, TissueClass, to_metadata

# Three classes: "tumour" wins on purple (blue-ish), "stroma" on pink (red), "background" on white.
CLASSES = (TissueClass("tumour", (200, 0, 0)), TissueClass("stroma", (0, 200, 0)),
           TissueClass("background", (255, 255, 255)))
# scores = W @ rgb + b (rgb in 0..255)
W = np.array([[-1.0, -1.0, 2.0],   # tumour: blue above red and green
              [2.0, -1.0, -1.0],   # stroma: red above green and blue
              [0.0, 0.0, 0.0]], np.float32)
B = np.array([0.0, 0.0, 60.0], np.float32)  # background wins unless a colour stands out by 60


def contract(**overrides) -> ModelContract:
    base = dict(name="colour-rule", version="1", mpp=2.0, tile_px=64, border_px=8,
                size_multiple=8, classes=CLASSES, tumour_classes=("tumour",),
                stroma_classes=("stroma",), background="background", input="uint8",
                output="logits")
    base.update(overrides)
    return ModelContract(**base)


def colour_rule_labels(rgb: np.ndarray) -> np.ndarray:
    """The label map (values 1..3) that colour_rule_model gives for ``rgb`` (h, w, 3)."""
    scores = rgb.astype(np.float32) @ W.T + B
    return (scores.argmax(axis=-1) + 1).astype(np.uint8)


def _save(graph: onnx.GraphProto, path: Path, meta: dict[str, str] | None) -> Path:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if meta:
        helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def colour_rule_model(path: Path, *, meta: dict[str, str] | None = None,
                      n_out: int = 3, input_type: int = TensorProto.UINT8) -> Path:
    """1x1 convolution of RGB. ``meta`` defaults to the colour-rule contract; pass {} for none.
    ``n_out`` other than 3 makes a model that breaks its contract."""
    w = np.zeros((n_out, 3, 1, 1), np.float32)
    b = np.zeros(n_out, np.float32)
    k = min(n_out, 3)
    w[:k, :, 0, 0], b[:k] = W[:k], B[:k]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["xf", "w", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "colour_rule",
        [helper.make_tensor_value_info("x", input_type, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out, "H", "W"])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return _save(graph, path, to_metadata(contract()) if meta is None else meta)


def box_filter_model(path: Path, *, depth: int, meta: dict[str, str] | None = None) -> Path:
    """Colour rule followed by ``depth`` 3x3 mean filters per class: each output pixel depends on
    inputs up to ``depth`` pixels away, no further."""
    w0 = W[:, :, None, None]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["xf", "w0", "b0"], ["h0"])]
    init = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(B, "b0")]
    box = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        box[c, c] = 1.0 / 9.0
    init.append(numpy_helper.from_array(box, "box"))
    for i in range(depth):
        nodes.append(helper.make_node("Conv", [f"h{i}", "box"], [f"h{i + 1}"],
                                      pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Identity", [f"h{depth}"], ["y"]))
    graph = helper.make_graph(
        nodes, "box_filter",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=init)
    return _save(graph, path, to_metadata(contract()) if meta is None else meta)
