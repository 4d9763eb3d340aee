"""The decoder fold (wsiseg.graph.fold_upsampling): nearest-neighbour upsampling + 3 x 3
convolution stored as one transposed convolution computes the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from wsiseg.graph import fold_upsampling, fold_weight, unfold_weight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _ort(proto_or_path, x):
    import onnxruntime as ort
    src = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") \
        else str(proto_or_path)
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _ops(proto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_fold_and_unfold_are_inverse():
    w = np.random.default_rng(1).normal(size=(5, 7, 3, 3)).astype(np.float32)
    wt = fold_weight(w)
    assert wt.shape == (7, 5, 4, 4)
    np.testing.assert_allclose(unfold_weight(wt), w, atol=1e-5)
    # corner taps of the transposed kernel are single conv taps, the middle ones sums of four
    assert wt[0, 0, 0, 0] == w[0, 0, 2, 2]
    np.testing.assert_allclose(wt[0, 0, 1, 1], w[0, 0, 1:, 1:].sum(), rtol=1e-6)


@pytest.fixture(scope="module")
def unfolded(tmp_path_factory):
    """A small U-Net exported by torch as is (Resize + Conv in the decoder), random weights."""
    torch = pytest.importorskip("torch")
    from wsiseg_train.unet import UNetConfig, build_model

    torch.manual_seed(0)
    model = build_model(UNetConfig(n_classes=13, width=4, depth=4, norm="none")).eval()
    path = tmp_path_factory.mktemp("fold") / "unfolded.onnx"
    dyn = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32, dtype=torch.uint8),), str(path),
                      dynamo=False, opset_version=18, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": dyn, "logits": dyn})
    return path


def test_folded_graph_computes_the_same_logits(unfolded):
    proto = onnx.load(str(unfolded))
    assert _ops(proto).get("Resize") == 3
    assert fold_upsampling(proto) == 3
    onnx.checker.check_model(proto)
    ops = _ops(proto)
    assert ops.get("ConvTranspose") == 3 and "Resize" not in ops
    # the Resize's size arithmetic (Shape, Gather, ...) went with it
    assert not {"Shape", "Gather", "Unsqueeze"} & set(ops)
    rng = np.random.default_rng(0)
    for shape in ((1, 3, 32, 48), (2, 3, 64, 16)):
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        np.testing.assert_allclose(_ort(proto, x), _ort(unfolded, x), atol=1e-4)
    assert fold_upsampling(proto) == 0   # nothing left to fold


def test_other_upsampling_is_left_alone(unfolded):
    proto = onnx.load(str(unfolded))
    for n in proto.graph.node:
        if n.op_type == "Resize":
            for a in n.attribute:
                if a.name == "mode":
                    a.s = b"linear"
    assert fold_upsampling(proto) == 0
    assert _ops(proto).get("Resize") == 3


def test_shipped_models_are_folded():
    for name in ("wsiseg-ebhi-unet.onnx", "wsiseg-ebhi-unet.int8.onnx"):
        ops = _ops(onnx.load(str(MODELS / name)))
        assert "Resize" not in ops and ops.get("ConvTranspose") == 4, (name, ops)


def test_fold_command(unfolded, tmp_path):
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from wsiseg_train.cli import main

    from wsiseg.contract import paper_contract, to_metadata

    src = tmp_path / "m.onnx"
    proto = onnx.load(str(unfolded))
    for k, v in to_metadata(paper_contract(tile_px=64, border_px=8)).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(src))
    out = tmp_path / "folded.onnx"
    r = CliRunner().invoke(main, ["fold", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["folded"] == 3 and result["max_abs_diff"] < 1e-4
    folded = onnx.load(str(out))
    assert {p.key: p.value for p in folded.metadata_props} == \
        {p.key: p.value for p in proto.metadata_props}
    # a second fold has nothing to do: usage error, nothing written
    again = tmp_path / "again.onnx"
    r = CliRunner().invoke(main, ["fold", str(out), "-o", str(again)])
    assert r.exit_code == 2 and "already folded" in r.output
    assert not again.exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["folded.onnx", "m.onnx"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = CliRunner().invoke(main, ["fold", str(bad), "-o", str(again)])
    assert r.exit_code == 2 and "not a model ONNX Runtime can load" in r.output
    assert not again.exists()


def _resize_conv(scale: float):
    """X -> Resize(nearest, asymmetric, floor, constant scales) -> 3x3 Conv -> Y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    scales = np.array([1, 1, scale, scale], np.float32)
    g = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest",
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
         helper.make_node("Conv", ["up", "w", "b"], ["y"], kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(scales, "scales")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_only_doubling_constant_scales_are_folded():
    x = np.random.default_rng(3).normal(size=(1, 2, 6, 5)).astype(np.float32)
    four = _resize_conv(4.0)
    assert fold_upsampling(four) == 0
    two = _resize_conv(2.0)
    want = _ort(two, x)
    assert fold_upsampling(two) == 1 and _ops(two) == {"ConvTranspose": 1}
    got = _ort(two, x)
    assert got.shape == want.shape == (1, 3, 12, 10)
    np.testing.assert_allclose(got, want, atol=1e-5)
