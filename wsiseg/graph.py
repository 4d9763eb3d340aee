"""ONNX graph edits: the only module of ``wsiseg`` that imports ``onnx``.

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


# Nearest-neighbour x2 upsampling followed by a 3 x 3 convolution (padding 1) is a transposed
# convolution of the low-resolution input (kernel 4, stride 2, padding 1): along each axis the
# output pixel 2i takes low-resolution rows i - 1 (tap 0) and i (taps 1 + 2), pixel 2i + 1 rows
# i (taps 0 + 1) and i + 1 (tap 2). FOLD_TAPS maps the 3 conv taps to the 4 transposed-conv
# taps (training/unet.py folds with it too).
FOLD_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def fold_weight(w):
    """Conv weight ``[out, in, 3, 3]`` -> ConvTranspose weight ``[in, out, 4, 4]``."""
    import numpy as np

    a = np.asarray(FOLD_TAPS, dtype=np.float64)
    return np.einsum("ks,oist,lt->iokl", a, w.astype(np.float64), a).astype(w.dtype)


def unfold_weight(wt):
    """Inverse of :func:`fold_weight` (the fold is injective: ``FOLD_TAPS`` has rank 3)."""
    import numpy as np

    p = np.linalg.pinv(np.asarray(FOLD_TAPS, dtype=np.float64))
    return np.einsum("sk,iokl,tl->oist", p, wt.astype(np.float64), p).astype(wt.dtype)


def unfolded_initializers(graph) -> dict:
    """The graph's initializers as numpy arrays, in graph order, with the weights of folded
    upsampling + convolutions (transposed convolutions) back in their 3 x 3 form."""
    from onnx import numpy_helper

    transposed = {n.input[1] for n in graph.node if n.op_type == "ConvTranspose"}
    return {t.name: unfold_weight(numpy_helper.to_array(t)) if t.name in transposed
            else numpy_helper.to_array(t) for t in graph.initializer}


def fold_upsampling(proto) -> int:
    """Rewrite, in place, every nearest-neighbour upsampling whose only reader is a 3 x 3
    convolution (stride 1, padding 1) as one transposed convolution of the low-resolution
    tensor: 4 instead of 9 taps per output pixel and no upsampled tensor. Exact for inputs
    whose sides are multiples of the contract's ``size_multiple`` (each upsampling then doubles
    the size); returns how many were folded. The new node and weight keep the old ones' names
    and places, so the weights stay in forward order."""
    from onnx import helper, numpy_helper

    g = proto.graph
    readers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    tensors = {t.name: t for t in g.initializer}   # the graph's own messages, edited in place
    folded = 0
    for node in list(g.node):
        conv = _upsample_conv(node, readers, tensors)
        if conv is None:
            continue
        weight = tensors[conv.input[1]]
        weight.CopyFrom(numpy_helper.from_array(fold_weight(numpy_helper.to_array(weight)),
                                                weight.name))
        new = helper.make_node("ConvTranspose", [node.input[0], *conv.input[1:]],
                               list(conv.output), name=conv.name, kernel_shape=[4, 4],
                               strides=[2, 2], pads=[1, 1, 1, 1])
        pos = list(g.node).index(conv)
        g.node.remove(conv)
        g.node.insert(pos, new)
        folded += 1
    _prune(g)
    return folded


def _upsample_conv(node, readers: dict, inits: dict):  # inits: name -> initializer
    """The 3 x 3 convolution that alone reads ``node``'s output, when ``node`` is a x2-able
    nearest-neighbour Resize (asymmetric coordinates, floor) and the pair can be folded."""
    if node.op_type != "Resize":
        return None
    a = {x.name: x for x in node.attribute}

    def s(key: str, default: str) -> str:
        return a[key].s.decode() if key in a else default

    if (s("mode", "nearest"), s("coordinate_transformation_mode", "half_pixel"),
            s("nearest_mode", "round_prefer_floor")) != ("nearest", "asymmetric", "floor"):
        return None
    # x2 only: constant scales must be (1, 1, 2, 2) and constant sizes cannot be; sizes taken
    # from the skip tensor's shape double under the size multiple (export and `fold` check it)
    ins = list(node.input) + [""] * 4
    if ins[3] in inits or (ins[2] and (ins[2] not in inits or
                                       _values(inits[ins[2]]) != [1.0, 1.0, 2.0, 2.0])):
        return None
    users = readers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Conv":
        return None
    conv = users[0]
    c = {x.name: x for x in conv.attribute}
    ints = {key: list(c[key].ints) for key in ("kernel_shape", "pads", "strides", "dilations")
            if key in c}
    ok = (ints.get("kernel_shape") == [3, 3] and ints.get("pads", [0] * 4) == [1, 1, 1, 1]
          and ints.get("strides", [1, 1]) == [1, 1] and ints.get("dilations", [1, 1]) == [1, 1]
          and (c["group"].i if "group" in c else 1) == 1 and "auto_pad" not in c
          and conv.input[0] == node.output[0] and conv.input[1] in inits)
    return conv if ok else None


def _values(tensor) -> list[float]:
    from onnx import numpy_helper

    return [float(v) for v in numpy_helper.to_array(tensor).ravel()]


def _prune(g) -> None:
    """Drop nodes whose outputs nobody reads (e.g. the folded Resizes and their size
    arithmetic) and initializers no node reads."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)
    made = {o for n in g.node for o in n.output}
    info = [v for v in g.value_info if v.name in made]
    del g.value_info[:]
    g.value_info.extend(info)
