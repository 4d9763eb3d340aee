"""ONNX graph edits made at load time: the only module that imports ``onnx``.

``add_label_head`` appends the per-pixel decision to a model's graph, so that a GPU hands back
two bytes per pixel instead of C float32 scores: ``labels`` uint8 ``[N, H, W]`` (ArgMax over the
classes, 0-based), ``top`` uint8 ``[N, H, W]`` (the top class probability x 255, for the QC
tally) and, when asked, ``scores`` uint8 ``[N, C, H, W]`` (class probability x 255,
rounded half to even as numpy's ``rint``; Softmax first when the model gives logits).
``onnx`` comes with the ``gpu`` extra; without it the engine decides on the host.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LABELS, TOP, SCORES = "labels", "top", "scores"


def available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def add_label_head(model: str | Path, *, probabilities: bool, output_kind: str = "logits"
                   ) -> bytes:
    """The serialised model of ``model`` with uint8 labels, top probability (and scores) as
    its outputs."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model))
    g = proto.graph
    if len(g.output) != 1:
        raise ValueError(f"{Path(model).name}: expected one output, found {len(g.output)}")
    out = g.output[0]
    dims = [d.dim_param or d.dim_value or None for d in out.type.tensor_type.shape.dim]
    n_dims = dims if len(dims) == 4 else ["N", "C", "H", "W"]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                default=13)
    nodes = [helper.make_node("ArgMax", [out.name], ["wsiseg_argmax"], axis=1, keepdims=0),
             helper.make_node("Cast", ["wsiseg_argmax"], [LABELS], to=TensorProto.UINT8)]
    prob = out.name
    if output_kind == "logits":
        nodes.append(helper.make_node("Softmax", [out.name], ["wsiseg_prob"], axis=1))
        prob = "wsiseg_prob"
    g.initializer.append(helper.make_tensor("wsiseg_255", TensorProto.FLOAT, [], [255.0]))
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        g.initializer.append(helper.make_tensor("wsiseg_axis1", TensorProto.INT64, [1], [1]))
        nodes.append(helper.make_node("ReduceMax", [prob, "wsiseg_axis1"], ["wsiseg_top"],
                                      keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMax", [prob], ["wsiseg_top"], axes=[1],
                                      keepdims=0))
    nodes += _to_u8(helper, TensorProto, "wsiseg_top", TOP)
    outputs = [helper.make_tensor_value_info(LABELS, TensorProto.UINT8,
                                             [n_dims[0], n_dims[2], n_dims[3]]),
               helper.make_tensor_value_info(TOP, TensorProto.UINT8,
                                             [n_dims[0], n_dims[2], n_dims[3]])]
    if probabilities:
        nodes += _to_u8(helper, TensorProto, prob, SCORES)
        outputs.append(helper.make_tensor_value_info(SCORES, TensorProto.UINT8, n_dims))
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(outputs)
    return proto.SerializeToString()


def _to_u8(helper, tensor_proto, name: str, out: str) -> list:
    """Nodes turning probabilities ``name`` into ``out`` = rint(255 x p) as uint8."""
    return [helper.make_node("Mul", [name, "wsiseg_255"], [f"{out}_x255"]),
            helper.make_node("Round", [f"{out}_x255"], [f"{out}_round"]),
            helper.make_node("Cast", [f"{out}_round"], [out], to=tensor_proto.UINT8)]
