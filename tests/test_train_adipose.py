"""Adipose-tissue patches (training/adipose.py): cells, membranes, colours, pasting, config."""

import csv

import numpy as np
import pytest
from skimage import measure
from skimage.io import imread
from train_helpers import EBHI_INDEX, tiny_config_text, write_pairs
from wsiseg_train.adipose import adipose, cells, paste_adipose, stain_colours
from wsiseg_train.aggregates import NucleusBank
from wsiseg_train.config import ConfigError, load_config
from wsiseg_train.data import Item
from wsiseg_train.sampling import Sampler
from wsiseg_train.sets import build_data
from wsiseg_train.train import make_sampler

TISSUE = np.array([200, 120, 180])    # eosin-pink
GLASS = np.array([236, 238, 242])


def _tissue_on_glass(size=128):
    image = np.empty((size, size, 3), np.uint8)
    image[:] = GLASS
    image[:, : size // 2] = TISSUE
    image[::9, : size // 2] = (70, 40, 120)      # a few dark (nuclear) rows
    return image


def test_cells_have_the_size_of_adipocytes_in_micrometres():
    for mpp in (1.0, 0.5):
        sizes = []
        for seed in range(4):
            lab = cells(256, mpp, np.random.default_rng(seed))
            props = measure.regionprops(measure.label(lab, connectivity=1, background=-1))
            # whole cells only (not cut by the patch's edge)
            sizes += [2 * np.sqrt(p.area / np.pi) * mpp for p in props
                      if p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < 256 and p.bbox[3] < 256]
        assert sizes and 30 < np.median(sizes) < 140


def test_a_sheet_is_lumen_of_the_slides_glass_with_thin_membranes_of_its_tissue():
    image = _tissue_on_glass()
    sheet, drawn = adipose(128, 1.0, image, np.random.default_rng(1))
    assert sheet.shape == (128, 128, 3) and sheet.dtype == np.uint8
    assert 0.02 < drawn.mean() < 0.25                    # thin lines, mostly lumen
    lumen = sheet[~drawn].astype(float)
    assert np.abs(np.median(lumen, 0) - GLASS).max() < 6
    # the membranes carry the tissue's stain (darker than glass, pink: red above green)
    membrane = sheet[drawn].astype(float)
    assert membrane.mean(1).mean() < GLASS.mean() - 30
    assert (membrane[:, 0] - membrane[:, 1]).mean() > 30
    # an all-white patch (beyond a crop's edge) still gives a sheet of plausible colours
    sheet, drawn = adipose(128, 1.0, np.full((128, 128, 3), 255, np.uint8),
                           np.random.default_rng(2))
    assert np.median(sheet[~drawn]) >= 215 and sheet[drawn].mean() < 215
    assert not np.array_equal(sheet, adipose(128, 1.0, image, np.random.default_rng(3))[0])


def test_paste_labels_the_blob_background_and_keeps_the_rest():
    image = _tissue_on_glass(64)
    labels = np.ones((64, 64), np.uint8)
    partial = False
    for seed in range(12):
        out, lab = paste_adipose(image, labels, 5, 1.0, np.random.default_rng(seed))
        changed = lab == 5
        assert changed.any() and set(np.unique(lab)) <= {1, 5}
        assert np.array_equal(out[~changed], image[~changed])
        partial |= not changed.all()
    assert partial
    assert (labels == 1).all() and np.array_equal(image, _tissue_on_glass(64))   # inputs kept
    with pytest.raises(ValueError, match="square"):
        paste_adipose(image[:, :32], labels[:, :32], 5, 1.0, np.random.default_rng(0))


def test_sampler_draws_adipose_patches_untaught_and_needs_a_background():
    image = _tissue_on_glass(96)
    item = Item("a", np.full((96, 96), 1, np.uint8), image=image, teacher=True)
    sampler = Sampler([item], patch_px=32, jitter_px=0, sparse_dense_ratio=1.0,
                      class_weights=None, augment_cfg=None, rng=np.random.default_rng(0),
                      background=5, adipose_p=0.5)
    b = sampler.batch_with_teacher(200, np.random.default_rng(1))
    fat = (b.labels == 5).any(axis=(1, 2))
    assert 0.35 < fat.mean() < 0.65
    assert not b.teach[fat].any() and b.teach[~fat].all()
    with pytest.raises(ValueError, match="adipose_p needs background"):
        Sampler([item], patch_px=32, jitter_px=0, sparse_dense_ratio=1.0, class_weights=None,
                augment_cfg=None, rng=np.random.default_rng(0), adipose_p=0.5)


def test_config_needs_a_background_class(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=1, n_val=1)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    cfg = load_config(tmp_path / "c.toml", ["data.adipose_p=0.2", "model.background=spare"])
    assert cfg.data.adipose_p == 0.2
    with pytest.raises(ConfigError, match="adipose_p needs model.background"):
        load_config(tmp_path / "c.toml", ["data.adipose_p=0.2", 'model.background=""'])
    with pytest.raises(ConfigError, match="data.adipose_p must be a probability"):
        load_config(tmp_path / "c.toml", ["data.adipose_p=1.5", "model.background=spare"])


def test_real_crops_give_fat_in_their_own_stain():
    if not EBHI_INDEX.is_file():
        pytest.skip(f"EBHI-Seg subset not found at {EBHI_INDEX} (shared data beside the checkout)")
    with EBHI_INDEX.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"][::60][:8]
    for i, r in enumerate(rows):
        image = imread(EBHI_INDEX.parent / r["image"])[..., :3]
        membrane, nucleus, lumen = stain_colours(image, np.random.default_rng(i))
        tissue = image[image.mean(2) < 200].astype(float)
        # the crop's own tissue colours (not a fixed pink): membranes within them, nuclei
        # darker, lumen light
        lo, hi = np.percentile(tissue, 1, axis=0), np.percentile(tissue, 99, axis=0)
        assert (membrane > lo).all() and (membrane < hi).all()
        assert nucleus.mean() < membrane.mean() < lumen.mean() and lumen.min() > 200
        sheet, drawn = adipose(image.shape[0], 1.0, image, np.random.default_rng(i))
        assert sheet[drawn].mean() < sheet[~drawn].mean() - 10


def test_training_config_reaches_the_sampler(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=2, n_val=1)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    cfg = load_config(tmp_path / "c.toml", ["data.adipose_p=1", "model.background=spare",
                                            "data.mpp=0.5"])
    with build_data(cfg) as data:
        sampler = make_sampler(cfg, data.train)
        assert sampler.adipose_p == 1 and sampler.mpp == 0.5 and sampler.background == 3
        _, labs = sampler.batch(4, np.random.default_rng(0))
    assert (labs == 3).any(axis=(1, 2)).all()


def test_fat_is_never_drawn_over_an_aggregate():
    rng = np.random.default_rng(7)
    stroma = np.clip(np.array([225, 170, 205]) + rng.normal(0, 5, (96, 96, 3)), 0, 255)
    rr, cc = np.mgrid[0:96, 0:96]
    for r in range(8, 90, 10):
        for c in range(8, 90, 10):
            stroma[(rr - r) ** 2 + (cc - c) ** 2 <= 9] = (60, 40, 120)
    image = stroma.astype(np.uint8)
    bank = NucleusBank.from_items([Item("b", np.full((96, 96), 2, np.uint8), image=image)], 2, 1.0)
    item = Item("a", np.full((96, 96), 1, np.uint8), image=image)
    sampler = Sampler([item], patch_px=32, jitter_px=0, sparse_dense_ratio=1.0,
                      class_weights=None, augment_cfg=None, rng=np.random.default_rng(0),
                      background=5, aggregate_p=0.5, aggregates=(bank, 2), adipose_p=1.0)
    _, labs = sampler.batch(100, np.random.default_rng(1))
    aggregate, fat = (labs == 2).any(axis=(1, 2)), (labs == 5).any(axis=(1, 2))
    assert aggregate.any() and fat.any()
    assert not (aggregate & fat).any() and (aggregate | fat).all()
