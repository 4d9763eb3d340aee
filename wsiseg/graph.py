"""ONNX graph edits made at load time: the only module that imports ``onnx``.

``add_label_head`` appends the per-pixel decision to a model's graph, so that a GPU hands back
one byte per pixel instead of C float32 scores: ``labels`` uint8 ``[N, H, W]`` (ArgMax over the
classes, 0-based) and, when asked, ``scores`` uint8 ``[N, C, H, W]`` (class probability x 255,
rounded half to even as numpy's ``rint``; Softmax first when the model gives logits).
``onnx`` comes with the ``gpu`` extra; without it the engine decides on the host.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LABELS, SCORES = "labels", "scores"


def available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def add_label_head(model: str | Path, *, probabilities: bool, output_kind: str = "logits"
                   ) -> bytes:
    """The serialised model of ``model`` with uint8 labels (and scores) as its outputs."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model))
    g = proto.graph
    if len(g.output) != 1:
        raise ValueError(f"{Path(model).name}: expected one output, found {len(g.output)}")
    out = g.output[0]
    dims = [d.dim_param or d.dim_value or None for d in out.type.tensor_type.shape.dim]
    n_dims = dims if len(dims) == 4 else ["N", "C", "H", "W"]
    nodes = [helper.make_node("ArgMax", [out.name], ["wsiseg_argmax"], axis=1, keepdims=0),
             helper.make_node("Cast", ["wsiseg_argmax"], [LABELS], to=TensorProto.UINT8)]
    outputs = [helper.make_tensor_value_info(LABELS, TensorProto.UINT8,
                                             [n_dims[0], n_dims[2], n_dims[3]])]
    if probabilities:
        prob = out.name
        if output_kind == "logits":
            nodes.append(helper.make_node("Softmax", [out.name], ["wsiseg_prob"], axis=1))
            prob = "wsiseg_prob"
        g.initializer.append(helper.make_tensor("wsiseg_255", TensorProto.FLOAT, [], [255.0]))
        nodes += [helper.make_node("Mul", [prob, "wsiseg_255"], ["wsiseg_prob255"]),
                  helper.make_node("Round", ["wsiseg_prob255"], ["wsiseg_round"]),
                  helper.make_node("Cast", ["wsiseg_round"], [SCORES], to=TensorProto.UINT8)]
        outputs.append(helper.make_tensor_value_info(SCORES, TensorProto.UINT8, n_dims))
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(outputs)
    return proto.SerializeToString()
