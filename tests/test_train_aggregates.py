"""Lymphoid-aggregate patches (training/aggregates.py): nuclei found, packed, pasted, labelled."""

import csv

import numpy as np
import pytest
from skimage.io import imread
from train_helpers import EBHI_INDEX, tiny_config_text, write_pairs
from wsiseg_train.aggregates import NucleusBank, aggregate, blob, find_nuclei, paste
from wsiseg_train.config import ConfigError, load_config
from wsiseg_train.data import Item
from wsiseg_train.sampling import Sampler
from wsiseg_train.sets import build_data
from wsiseg_train.train import make_sampler

STROMA = np.array([225, 170, 205])    # pale pink
NUCLEUS = np.array([60, 40, 120])     # haematoxylin blue


def _stroma_with_nuclei(rng, size=96, n=40, radius=3):
    """Pale stroma with ``n`` dark round nuclei (and one large dark blob that is no nucleus)."""
    image = np.clip(STROMA + rng.normal(0, 5, (size, size, 3)), 0, 255)
    rr, cc = np.mgrid[0:size, 0:size]
    centres = []
    while len(centres) < n:
        r, c = rng.integers(8, size - 8, 2)
        if all((r - a) ** 2 + (c - b) ** 2 > (3 * radius) ** 2 for a, b in centres):
            centres.append((r, c))
    for r, c in centres:
        image[(rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2] = NUCLEUS
    image[:20, :20] = NUCLEUS                # 400 px: far above a lymphocyte's area
    return image.astype(np.uint8), centres


def test_find_nuclei_keeps_small_round_dark_nuclei_only():
    rng = np.random.default_rng(0)
    image, centres = _stroma_with_nuclei(rng)
    source = find_nuclei(image, np.ones(image.shape[:2], bool), mpp=1.0)
    assert source is not None
    # the darker half of the 40 nuclei (all equally dark here: at least half), none the big blob
    assert 20 <= len(source.nuclei) <= 40
    assert all(a.shape[0] <= 12 and a.shape[1] <= 12 for _, a in source.nuclei)
    for rgb, alpha in source.nuclei:
        inside = rgb[alpha > 0.9]
        assert np.abs(inside.mean(0) - NUCLEUS).max() < 25
    assert np.abs(source.stroma - STROMA).max() < 10
    # outside the class region nothing is found; sizes are in micrometres
    assert find_nuclei(image, np.zeros(image.shape[:2], bool), mpp=1.0) is None
    assert find_nuclei(image, np.ones(image.shape[:2], bool), mpp=0.25) is None


def test_aggregate_is_a_dense_sheet_of_the_sources_nuclei():
    rng = np.random.default_rng(1)
    image, _ = _stroma_with_nuclei(rng)
    source = find_nuclei(image, np.ones(image.shape[:2], bool), mpp=1.0)
    sheet = aggregate(64, source, 1.0, np.random.default_rng(2))
    assert sheet.shape == (64, 64, 3) and sheet.dtype == np.uint8
    dark = np.abs(sheet.astype(float) - NUCLEUS).max(axis=2) < 40
    # a sheet: nuclei cover much of it (in the source image they cover about 13 %)
    source_dark = np.abs(image.astype(float) - NUCLEUS).max(axis=2)[20:, 20:] < 40
    assert dark.mean() > 0.3 > source_dark.mean()
    assert not np.array_equal(sheet, aggregate(64, source, 1.0, np.random.default_rng(3)))


def test_paste_labels_the_blob_and_keeps_the_rest():
    rng = np.random.default_rng(4)
    image, _ = _stroma_with_nuclei(rng)
    bank = NucleusBank.from_items([Item("a", np.full(image.shape[:2], 2, np.uint8),
                                        image=image)], 2, 1.0)
    patch = np.full((48, 48, 3), 200, np.uint8)
    labels = np.ones((48, 48), np.uint8)
    seen_partial = False
    for seed in range(12):
        out, lab = paste(patch, labels, bank, 3, np.random.default_rng(seed))
        changed = lab == 3
        assert changed.any() and set(np.unique(lab)) <= {1, 3}
        assert np.array_equal(out[~changed], patch[~changed])     # outside: untouched
        seen_partial |= not changed.all()
    assert seen_partial
    assert np.array_equal(labels, np.ones((48, 48), np.uint8))    # inputs not modified
    shapes = [blob(40, np.random.default_rng(s)).mean() for s in range(30)]
    assert min(shapes) < 0.7 and max(shapes) == 1.0


def test_an_empty_bank_says_how_to_fix_it():
    flat = np.full((64, 64, 3), 220, np.uint8)
    with pytest.raises(ValueError, match="data.aggregate_p"):
        NucleusBank.from_items([Item("a", np.full((64, 64), 2, np.uint8), image=flat)], 2, 1.0)


def test_sampler_pastes_aggregates_into_unlabelled_untaught_patches():
    rng = np.random.default_rng(5)
    image, _ = _stroma_with_nuclei(rng)
    labels = np.full(image.shape[:2], 1, np.uint8)
    item = Item("a", labels, image=image, teacher=True)
    bank = NucleusBank.from_items([Item("b", np.full(image.shape[:2], 2, np.uint8),
                                        image=image)], 2, 1.0)
    sampler = Sampler([item], patch_px=32, jitter_px=0, sparse_dense_ratio=1.0,
                      class_weights=None, augment_cfg=None, rng=np.random.default_rng(0),
                      aggregate_p=0.5, aggregates=(bank, 2))
    _, labs, teach, _, _ = sampler.batch_with_teacher(200, np.random.default_rng(1))
    pasted = (labs == 2).any(axis=(1, 2))
    assert 0.35 < pasted.mean() < 0.65
    assert not teach[pasted].any() and teach[~pasted].all()
    with pytest.raises(ValueError, match="aggregates"):
        Sampler([item], patch_px=32, jitter_px=0, sparse_dense_ratio=1.0, class_weights=None,
                augment_cfg=None, rng=np.random.default_rng(0), aggregate_p=0.5)


def test_config_needs_a_listed_aggregate_class(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=1, n_val=1)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    with pytest.raises(ConfigError, match="needs data.aggregate_class"):
        load_config(tmp_path / "c.toml", ["data.aggregate_p=0.2"])
    with pytest.raises(ConfigError, match="'lymph' is used in the config but not listed"):
        load_config(tmp_path / "c.toml", ["data.aggregate_p=0.2", "data.aggregate_class=lymph"])
    with pytest.raises(ConfigError, match="data.aggregate_p must be a probability"):
        load_config(tmp_path / "c.toml", ["data.aggregate_p=2", "data.aggregate_class=other"])


def test_real_lesion_stroma_gives_nuclei():
    if not EBHI_INDEX.is_file():
        pytest.skip(f"EBHI-Seg subset not found at {EBHI_INDEX} (shared data beside the checkout)")
    with (EBHI_INDEX.parent / "index-lesions.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"][:12]
    found = 0
    for r in rows:
        image = imread(EBHI_INDEX.parent / r["image"])[..., :3]
        mask = imread(EBHI_INDEX.parent / r["label"])
        source = find_nuclei(image, (mask if mask.ndim == 2 else mask[..., 0]) < 128, 1.0)
        if source is not None:
            found += 1
            # lymphocytes are darker than the stroma between them
            assert all(rgb[a > 0.9].mean() < source.stroma.mean() - 30 for rgb, a in source.nuclei)
    assert found >= 6


def test_training_config_builds_the_bank_from_the_class(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "p"
    folder.mkdir()
    from skimage.io import imsave
    rows = ["image,label,class,split"]
    for i in range(3):
        image, _ = _stroma_with_nuclei(rng)
        imsave(folder / f"i{i}.png", image, check_contrast=False)
        imsave(folder / f"m{i}.png", np.zeros(image.shape[:2], np.uint8), check_contrast=False)
        rows.append(f"i{i}.png,m{i}.png,A,{'train' if i < 2 else 'val'}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "c.toml").write_text(tiny_config_text(folder / "index.csv"))
    cfg = load_config(tmp_path / "c.toml", ["data.aggregate_p=1", "data.aggregate_class=spare"])
    with pytest.raises(ValueError, match="data.aggregate_class"):   # no pixel of "spare"
        with build_data(cfg) as data:
            make_sampler(cfg, data.train)
    cfg = load_config(tmp_path / "c.toml", ["data.aggregate_p=1", "data.aggregate_class=other"])
    with build_data(cfg) as data:
        sampler = make_sampler(cfg, data.train)
        assert len(sampler.aggregates[0]) == 2 and sampler.aggregates[1] == 2
        _, labs = sampler.batch(4, np.random.default_rng(0))
        assert (labs == 2).any(axis=(1, 2)).all()
