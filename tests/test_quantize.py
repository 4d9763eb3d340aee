"""Precision twins: the contract key, int8 quantisation from an ONNX file, the accuracy gate,
and ``wsiseg segment --precision``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synth import make_slide, make_tissue_rgb

from wsiseg.contract import ContractError, from_metadata, paper_contract, to_metadata, twin_path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wsiseg-ebhi-unet.onnx"
DEMO = ROOT / "examples" / "ebhi-val-mosaic.tif"


def test_precision_key_is_backwards_compatible():
    meta = to_metadata(paper_contract())
    assert "wsiseg.precision" not in meta  # fp32 models keep the keys they had
    assert from_metadata(meta).precision == "fp32"
    int8 = to_metadata(paper_contract(precision="int8"))
    assert int8["wsiseg.precision"] == "int8"
    assert from_metadata(int8).precision == "int8"
    with pytest.raises(ContractError, match="precision must be one of"):
        from_metadata({**meta, "wsiseg.precision": "int4"})


def test_twin_path():
    assert twin_path("models/x.onnx", "int8") == Path("models/x.int8.onnx")
    assert twin_path("x.onnx", "fp16") == Path("x.fp16.onnx")
    assert twin_path("x.onnx", "fp32") == Path("x.onnx")


def test_agreement_and_dice_drop():
    pytest.importorskip("torch")
    from wsiseg_train.quantgate import GateLimits, agreement, dice_fails

    ref = np.array([[1, 1, 2, 2], [1, 1, 2, 0]], np.uint8)
    got = np.array([[1, 1, 2, 1], [1, 1, 2, 0]], np.uint8)
    assert agreement(ref, got) == (pytest.approx(6 / 7), 7)  # 0 in both: not analysed
    dice = {"a": {"fp32": 0.90, "twin": 0.895}, "b": {"fp32": 0.50, "twin": 0.48},
            "c": {"fp32": 0.70, "twin": 0.75}}
    assert dice_fails(dice, GateLimits()) == ["b Dice 0.4800 < fp32 0.5000 - 0.01"]
    assert dice_fails(dice, GateLimits(max_drop=0.03)) == []


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-level U-Net trained for a few iterations on synthetic pairs, exported to ONNX."""
    pytest.importorskip("torch")
    from train_helpers import tiny_config_text, write_pairs
    from wsiseg_train.config import load_config
    from wsiseg_train.train import train

    tmp = tmp_path_factory.mktemp("tiny")
    index = write_pairs(tmp / "pairs", n_train=6, size=48)
    cfg_path = tmp / "tiny.toml"
    cfg_path.write_text(tiny_config_text(index, export=True))
    cfg = load_config(cfg_path)
    train(cfg, tmp / "run")
    return tmp / "run" / "model.onnx", cfg


@pytest.mark.train
def test_quantize_from_onnx_keeps_contract_and_head(tiny_model, tmp_path):
    import onnx
    from wsiseg_train.quantize import full_resolution_convs, head_node, quantize_int8

    model, cfg = tiny_model
    full = full_resolution_convs(model)  # 3 levels: 2 encoder convs, up-conv, 2 block convs, head
    assert len(full) == 6 and full[-1] == head_node(model)
    assert all("down.0" in n or "up.1" in n or "up_convs.1" in n or "head" in n for n in full)
    out = tmp_path / "m.int8.onnx"
    result = quantize_int8(model, cfg, out, n_images=4, exclude=(head_node(model),))
    assert result["calibration"].startswith("4 train-split images")
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    twin, fp32 = from_metadata(meta), from_metadata(
        {p.key: p.value for p in onnx.load(str(model)).metadata_props})
    assert twin.precision == "int8" and twin.class_names == fp32.class_names
    assert json.loads(meta["wsiseg.training"])["int8"]["fp32_nodes"] == [head_node(model)]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 3
    head = next(n for n in proto.graph.node if n.name == head_node(model))
    weights = {i.name for i in proto.graph.initializer}
    assert head.input[1] in weights  # the head's weights stay float, not DequantizeLinear
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8(out, cfg, tmp_path / "again.onnx", n_images=2)


@pytest.mark.train
def test_int8_twin_segments_like_fp32(tiny_model, tmp_path):
    from wsiseg_train.quantgate import run_gate
    from wsiseg_train.quantize import quantize_int8

    model, cfg = tiny_model
    twin = quantize_int8(model, cfg, tmp_path / "m.int8.onnx", n_images=6)["path"]
    rgb, _ = make_tissue_rgb(192, 160, np.random.default_rng(3))
    slide = tmp_path / "s.tif"
    make_slide(slide, rgb, mpp=cfg.data.mpp)
    gate = run_gate(model, twin, data=None, slides={"synthetic": slide})
    r = gate["slides"]["synthetic"]
    assert gate["precision"] == "int8" and r["pixels"] > 0
    assert r["agreement"] > 0.9


@pytest.mark.slow
@pytest.mark.train
def test_shipped_int8_twin_passes_the_gate(shared_data):
    from wsiseg_train.quantgate import run_gate

    if not (shared_data / "ebhi-seg" / "index.csv").is_file():
        pytest.skip(f"{shared_data} has no EBHI-Seg data (the gate's labels)")
    twin = twin_path(SHIPPED, "int8")
    cmu1 = ROOT / "examples" / "CMU-1-Small-Region.svs"
    gate = run_gate(SHIPPED, twin, data=shared_data, limit=16,
                    slides={"demo": DEMO, "cmu-1": cmu1})
    assert set(gate["slides"]) == {"ebhi-val", "kather-2016", "demo", "cmu-1"}
    for name, r in gate["slides"].items():
        assert r["agreement"] >= 0.99, (name, r)
    ebhi = gate["slides"]["ebhi-val"]
    assert all(d["twin"] >= d["fp32"] - 0.01 for d in ebhi["dice"].values()), ebhi
    kather = gate["slides"]["kather-2016"]
    assert kather["calls_unchanged"] == kather["tiles"] == 24
    assert gate["passed"]


def test_shipped_twin_has_the_models_contract():
    import onnx

    def contract(path):
        return from_metadata({p.key: p.value for p in onnx.load(
            str(path), load_external_data=False).metadata_props})

    fp32, int8 = contract(SHIPPED), contract(twin_path(SHIPPED, "int8"))
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert "int8" in int8.training  # how it was quantised, beside the fp32 model's notes
    assert {**int8.to_dict(), "precision": "fp32", "training": {}} == {
        **fp32.to_dict(), "training": {}}


def test_segment_precision_picks_the_twin(tmp_path):
    from wsiseg.cli import main

    args = ["-q", "segment", str(DEMO), "-o", str(tmp_path / "d.tif"), "--no-tsr",
            "--no-geojson", "--no-preview", "--no-csv", "--device", "cpu"]
    missing = CliRunner().invoke(main, [*args, "--precision", "fp16"])
    assert missing.exit_code == 2
    assert "no wsiseg-ebhi-unet.fp16.onnx beside" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    done = CliRunner().invoke(main, [*args, "--precision", "int8"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["model"]["precision"] == "int8"
    assert report["model"]["path"].endswith("wsiseg-ebhi-unet.int8.onnx")
    assert report["parameters"]["precision"] == "int8"
    assert report["timing"]["bound_by"] in ("reader", "model")


@pytest.mark.slow
@pytest.mark.train
def test_export_int8_gates_the_twin(tiny_model, tmp_path):
    from wsiseg_train.cli import main as train_main
    from wsiseg_train.quantgate import DATA

    if not (DATA / "kather-samples" / "labelled-2016").is_dir():
        pytest.skip(f"{DATA} not present (the gate's data)")
    model, _ = tiny_model
    out = tmp_path / "m.onnx"
    done = CliRunner().invoke(train_main, ["export", str(model.parent), "-o", str(out), "--int8"])
    gate = json.loads((tmp_path / "m.int8.gate.json").read_text())["gate"]
    assert out.is_file() and set(gate["slides"]) == {"ebhi-val", "kather-2016"}
    # a barely trained toy model may fail the gate: then the twin is removed and exit is 1
    assert done.exit_code == (0 if gate["passed"] else 1), done.output
    assert (tmp_path / "m.int8.onnx").is_file() == gate["passed"]
