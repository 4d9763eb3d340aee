"""Training levers for other labs' tissue: stain transfer, mosaic and island patches,
unannotated epithelium, the v3 config, and the QC calibration written into a model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from onnx_models import colour_rule_model
from skimage.color import rgb2lab
from wsiseg_train.augment import AugmentConfig, lab_transfer
from wsiseg_train.calibrate import calibrate, write_qc
from wsiseg_train.config import ConfigError, load_config
from wsiseg_train.data import Item
from wsiseg_train.ebhi import mapping_for_set
from wsiseg_train.sampling import Sampler, island, mosaic
from wsiseg_train.sets import class_values

from wsiseg.engine import load_model

ROOT = Path(__file__).resolve().parents[1]
V3 = ROOT / "training" / "configs" / "default-model-v3.toml"


def _tissue(size=32, colour=(110, 60, 150)):
    image = np.full((size, size, 3), 250, np.uint8)
    image[4:28, 4:28] = colour
    return image


def test_lab_transfer_moves_the_tissue_mean_and_keeps_glass_white():
    x = _tissue().astype(np.float32) / 255
    out = lab_transfer(x, (50.0, 30.0, -5.0))
    lab = rgb2lab(out)
    tissue = lab[8:24, 8:24].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(tissue, (50.0, 30.0, -5.0), atol=2.5)
    assert lab[0, 0, 0] > 95 and abs(lab[0, 0, 1]) < 2   # glass stays near white
    assert lab_transfer(np.ones((8, 8, 3), np.float32), (50, 30, -5)) is not None


def test_lab_ranges_are_checked():
    with pytest.raises(ValueError, match="lab_b_target"):
        AugmentConfig(lab_b_target=(5.0, -5.0))


def test_island_keeps_one_window_on_glass_labelled_background():
    rng = np.random.default_rng(0)
    image = _tissue(64)
    labels = np.full((64, 64), 2, np.uint8)
    img, lab = island(image, labels, 20, 5, rng)
    kept = lab == 2
    assert kept.sum() == 400 and (lab[~kept] == 5).all()
    rows, cols = np.nonzero(kept)
    assert np.ptp(rows) == 19 and np.ptp(cols) == 19                 # one square window
    assert (img[kept] == image[kept]).all()
    assert img[~kept].min() >= 225                               # glass is near white
    _, lab0 = island(image, labels, 20, 0, rng)                  # no background class
    assert (lab0[lab0 != 2] == 0).all()


def test_mosaic_puts_four_parts_in_reading_order():
    parts = [(np.full((4, 4, 3), i, np.uint8), np.full((4, 4), i, np.uint8)) for i in range(4)]
    img, lab = mosaic(parts)
    assert img.shape == (8, 8, 3) and lab.shape == (8, 8)
    assert [lab[0, 0], lab[0, 7], lab[7, 0], lab[7, 7]] == [0, 1, 2, 3]


def test_sampler_mixes_mosaic_and_island_patches():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 100, 150)
    image[:, 32:] = (100, 60, 150)
    labels = np.zeros((64, 64), np.uint8)
    labels[:, :32], labels[:, 32:] = 1, 2
    items = [Item("a", labels, image=image)]
    s = Sampler(items, patch_px=32, jitter_px=0, sparse_dense_ratio=1.0, class_weights=None,
                augment_cfg=None, rng=np.random.default_rng(0), mosaic_p=0.5, island_p=0.5,
                island_px=(8, 16), background=3)
    x, y = s.batch(40, np.random.default_rng(1))
    assert x.shape == (40, 3, 32, 32) and y.shape == (40, 32, 32)
    with_glass = [(lab == 3).any() for lab in y]
    assert 5 <= sum(with_glass) <= 35               # about half the patches are islands
    for img, lab in zip(x, y):                      # labels still match the pixels
        assert (img[0][lab == 1] == 200).all() and (img[0][lab == 2] == 100).all()


def test_v3_config_loads_both_sets_and_leaves_adenoma_epithelium_unannotated():
    cfg = load_config(V3)
    assert cfg.model.version == "3" and len(cfg.data.sets) == 2
    assert cfg.augment.lab and 0 < cfg.data.island_p < 1 and 0 < cfg.data.mosaic_p < 1
    lesions = cfg.data.sets[1]
    assert lesions.foreground_map["Low-grade IN"] == ""
    values = class_values(cfg)
    mapping = mapping_for_set(lesions, values)
    image = np.full((40, 40, 3), (200, 120, 170), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    image[mask > 0] = (110, 60, 150)
    adenoma = mapping(mask, {"class": "Low-grade IN", "image": "a", "split": "val"}, image)
    polyp = mapping(mask, {"class": "Polyp", "image": "b", "split": "val"}, image)
    assert adenoma[20, 20] == 0 and polyp[20, 20] == values["healthy glands"]
    assert adenoma[2, 2] == polyp[2, 2] == values["lamina propria stroma"]


def test_gland_edge_ring_width_comes_from_the_set(tmp_path):
    cfg = load_config(V3, ["data.sets.1.edge_ring_um=1.0"])
    assert cfg.data.sets[0].edge_ring_um == 3.0 and cfg.data.sets[1].edge_ring_um == 1.0
    values = class_values(cfg)
    image = np.full((40, 40, 3), (200, 120, 170), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    image[mask > 0] = (110, 60, 150)
    row = {"class": "Polyp", "image": "p", "split": "val"}
    wide = mapping_for_set(cfg.data.sets[0].__class__(**{**cfg.data.sets[1].__dict__,
                                                          "edge_ring_um": 3.0}), values)
    thin = mapping_for_set(cfg.data.sets[1], values)
    gland, stroma = values["healthy glands"], values["lamina propria stroma"]
    # 3 um: the pixels 1-3 px inside and outside the edge are unannotated; 1 um: only the first
    assert wide(mask, row, image)[20, 11] == 0 and wide(mask, row, image)[20, 7] == 0
    assert thin(mask, row, image)[20, 11] == gland and thin(mask, row, image)[20, 7] == stroma
    assert thin(mask, row, image)[20, 10] == 0 and thin(mask, row, image)[20, 9] == 0
    with pytest.raises(ConfigError, match="edge_ring_um must be >= 0"):
        load_config(V3, ["data.sets.0.edge_ring_um=-1"])


def test_context_settings_are_checked(tmp_path):
    text = V3.read_text().replace('"../../../shared', f'"{V3.parent.as_posix()}/../../../shared')
    path = tmp_path / "bad.toml"
    bad = re.sub(r"(?m)^island_p = [0-9.]+", "island_p = 1.5", text)
    assert bad != text
    path.write_text(bad)
    with pytest.raises(ConfigError, match="island_p"):
        load_config(path)
    path.write_text(text.replace("island_px = [40, 112]", "island_px = [40, 400]"))
    with pytest.raises(ConfigError, match="island_px"):
        load_config(path)


def test_calibration_is_written_into_the_model(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        img = _tissue(32, tuple(int(v) for v in rng.integers(80, 200, 3)))
        items.append(Item(f"{i}", np.zeros((32, 32), np.uint8), image=img))
    model = colour_rule_model(tmp_path / "m.onnx")
    qc = calibrate(model, items[:4], items[4:])
    assert qc["stain_warn"] >= 2.0 and 0 < qc["confidence_threshold"] <= 1
    assert qc["low_confidence_warn"] >= 2 * qc["low_confidence_val"]
    out = write_qc(model, qc, tmp_path / "calibrated.onnx")
    c = load_model(out, device="cpu").contract
    assert c.qc == json.loads(json.dumps(qc))
    assert dataclasses.replace(c, qc={}) == load_model(model, device="cpu").contract
