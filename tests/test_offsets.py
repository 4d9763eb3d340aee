"""Per-class logit offsets: the fit, the graph edit and ``wsiseg-train calibrate-offsets``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_models import box_filter_model, colour_rule_model, contract
from train_helpers import tiny_config_text, write_pairs

from wsiseg.contract import TissueClass, to_metadata
from wsiseg.engine import load_model

pytest.importorskip("torch")  # wsiseg-train needs the training extra

from wsiseg_train.cli import main  # noqa: E402
from wsiseg_train.offsets import apply_offsets, fit_offsets, mean_dice  # noqa: E402


def biased_logits(n: int = 6000, shift: float = 1.5, seed: int = 0):
    """Three-class logits whose class 3 is favoured by ``shift`` everywhere (a prior offset)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 4, n).astype(np.uint8)
    logits = rng.normal(0, 1.0, (n, 3)).astype(np.float32)
    logits[np.arange(n), labels - 1] += 2.0
    logits[:, 2] += shift
    return logits, labels


def test_fit_finds_the_prior_shift_and_leaves_fixed_classes():
    logits, labels = biased_logits()
    before, _ = mean_dice(logits, labels, np.zeros(3, np.float32))
    off = fit_offsets(logits, labels, movable=[2])
    after, dice = mean_dice(logits, labels, off)
    assert off[0] == off[1] == 0
    assert -2.0 <= off[2] <= -1.0          # undoes most of the +1.5 shift
    assert after > before + 0.05 and np.all(np.isfinite(dice))
    # unbiased logits: nothing beyond one grid step of sampling noise
    fair, fair_labels = biased_logits(shift=0.0)
    assert np.abs(fit_offsets(fair, fair_labels, movable=[0, 1, 2])).max() <= 0.25


def test_mean_dice_ignores_absent_classes():
    logits = np.array([[5, 0, 0], [0, 5, 0]], np.float32)
    score, dice = mean_dice(logits, np.array([1, 2], np.uint8), np.zeros(3, np.float32))
    assert score == 1.0 and np.isnan(dice[2])


def test_apply_offsets_adds_to_the_output_bias_and_records_them(tmp_path):
    model = colour_rule_model(tmp_path / "m.onnx")
    out = apply_offsets(model, [0.0, 5.0, -2.0], tmp_path / "c.onnx", {"split": "train"})
    x = np.random.default_rng(1).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    old, new = load_model(model, device="cpu", head="host"), load_model(out, device="cpu",
                                                                         head="host")
    np.testing.assert_allclose(new.run(x) - old.run(x),
                               np.broadcast_to(np.array([0, 5, -2], np.float32)[None, :, None,
                                                                                  None],
                                               (1, 3, 16, 16)), atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rec = json.loads(meta["wsiseg.training"])["class_offsets"]
    assert rec["offsets"] == {"tumour": 0.0, "stroma": 5.0, "background": -2.0}
    assert rec["split"] == "train"
    # a second calibration adds up
    again = apply_offsets(out, [1.0, 0.0, 0.0], tmp_path / "c2.onnx")
    meta = {p.key: p.value for p in onnx.load(str(again)).metadata_props}
    assert json.loads(meta["wsiseg.training"])["class_offsets"]["offsets"]["tumour"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c2.onnx", "m.onnx"]


def test_apply_offsets_refuses_what_it_cannot_edit(tmp_path):
    with pytest.raises(ValueError, match="written by a convolution"):
        apply_offsets(box_filter_model(tmp_path / "box.onnx", depth=1), [0, 0, 0],
                      tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="need 3 offsets"):
        apply_offsets(colour_rule_model(tmp_path / "m.onnx"), [0, 0], tmp_path / "b.onnx")
    twin = colour_rule_model(tmp_path / "t.onnx",
                             meta=to_metadata(contract(precision="int8")))
    with pytest.raises(ValueError, match="int8 twin"):
        apply_offsets(twin, [0, 0, 0], tmp_path / "c.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.onnx", "m.onnx", "t.onnx"]


def _pairs_model(tmp_path: Path) -> Path:
    """The colour rule under the tiny config's class names (disc, other, spare)."""
    classes = (TissueClass("disc", (200, 0, 0)), TissueClass("other", (0, 200, 0)),
               TissueClass("spare", (0, 0, 200)))
    meta = to_metadata(contract(classes=classes, tumour_classes=("disc",),
                                stroma_classes=(), background=None, size_multiple=8))
    return colour_rule_model(tmp_path / "rule.onnx", meta=meta)


def test_calibrate_offsets_command(tmp_path):
    index = write_pairs(tmp_path / "pairs", n_train=6, n_val=2, size=32)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config_text(index))
    model = _pairs_model(tmp_path)
    out = tmp_path / "calibrated.onnx"
    r = CliRunner().invoke(main, ["calibrate-offsets", str(model), str(config), "-o", str(out),
                                  "--stride", "1", "--version", "1.1"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["offsets"]["disc"] == 0.0 and result["fixed"] == ["disc"]
    assert result["mean_dice_after"] >= result["mean_dice_before"]
    assert result["images"] == 6 and result["split"] == "train"
    assert load_model(out, device="cpu").contract.version == "1.1"
    x = np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    diff = (load_model(out, device="cpu").run(x) - load_model(model, device="cpu").run(x))
    expected = np.array([result["offsets"][n] for n in ("disc", "other", "spare")])
    np.testing.assert_allclose(diff.mean(axis=(0, 2, 3)), expected, atol=1e-4)


def test_calibrate_offsets_bad_input_is_one_line(tmp_path):
    index = write_pairs(tmp_path / "pairs", n_train=2, n_val=1, size=32)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config_text(index))
    model = _pairs_model(tmp_path)
    r = CliRunner().invoke(main, ["calibrate-offsets", str(model), str(config), "-o",
                                  str(tmp_path / "x.onnx"), "--fixed", "tumour"])
    assert r.exit_code == 2 and "not a class of the model" in r.output
    r = CliRunner().invoke(main, ["calibrate-offsets", str(tmp_path / "none.onnx"), str(config),
                                  "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "x.onnx").exists()
