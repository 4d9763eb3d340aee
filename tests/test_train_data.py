"""Image/mask pairs, value mappings, class-first sampling and the sparse:dense ratio."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.io import imsave
from train_helpers import EBHI_INDEX, tiny_config_text, write_pairs
from wsiseg_train.augment import AugmentConfig
from wsiseg_train.config import ConfigError, load_config
from wsiseg_train.data import (
    Item,
    load_pairs,
    mirrored,
    read_region,
    threshold_mapping,
    value_mapping,
)
from wsiseg_train.sampling import Sampler, class_index, extract, sample_center, validation_set
from wsiseg_train.sets import build_data


def test_mappings():
    mask = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert threshold_mapping(128, 3, 1)(mask, {}).tolist() == [[1, 1, 3, 3]]
    pick = threshold_mapping(128, lambda row: {"A": 4, "B": 5}[row["class"]])
    assert pick(mask, {"class": "B"}).tolist() == [[0, 0, 5, 5]]
    assert value_mapping({0: 2, 255: 1})(mask, {}).tolist() == [[2, 0, 0, 1]]


def test_pairs_from_config_split_and_limit(tmp_path):
    index = write_pairs(tmp_path / "pairs", n_train=4, n_val=2)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    cfg = load_config(tmp_path / "c.toml")
    with build_data(cfg) as data:
        assert len(data.train) == 4 and len(data.val) == 2
        item = data.train[0]
        assert item.image.shape == (32, 32, 3) and item.labels.shape == (32, 32)
        assert set(np.unique(item.labels)) == {1, 2}       # disc = 1, other = 2
    cfg = load_config(tmp_path / "c.toml", ["data.sets.limit=1"])
    with build_data(cfg) as data:
        assert len(data.train) == 1 and len(data.val) == 1


def test_image_and_mask_of_different_sizes(tmp_path):
    imsave(tmp_path / "i.png", np.zeros((20, 30, 3), np.uint8), check_contrast=False)
    imsave(tmp_path / "m.png", np.zeros((20, 20), np.uint8), check_contrast=False)
    (tmp_path / "index.csv").write_text("image,label\ni.png,m.png\n")
    with pytest.raises(ValueError, match="i.png is 30x20 px but its mask m.png is 20x20 px"):
        load_pairs(tmp_path / "index.csv", threshold_mapping(128, 1))


def _item(labels, annotation="dense"):
    labels = np.asarray(labels, dtype=np.uint8)
    return Item("x", labels, annotation, image=np.zeros((*labels.shape, 3), np.uint8))


def test_class_first_sampling_follows_the_class_weights():
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[:90] = 1            # common class
    labels[95:, :5] = 2        # rare: 25 pixels
    index = class_index([_item(labels)], np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for p, expected in ((np.array([0.5, 0.5]), 0.5), (np.array([0.8, 0.2]), 0.2)):
        hits = [labels[r, c] for _, r, c in (sample_center(index, p, 0, rng) for _ in range(2000))]
        assert np.mean(np.array(hits) == 2) == pytest.approx(expected, abs=0.04)


def test_jitter_stays_within_bounds_and_items_by_annotated_area():
    a = np.zeros((50, 50), np.uint8)
    a[25, 25] = 1
    b = np.zeros((50, 50), np.uint8)
    b[:3, :] = 1                # 150 pixels against 1 in a
    index = class_index([_item(a), _item(b)], np.random.default_rng(0))
    rng = np.random.default_rng(2)
    draws = [sample_center(index, np.array([1.0]), 3, rng) for _ in range(1500)]
    in_a = [(r, c) for i, r, c in draws if i == 0]
    assert 0 < len(in_a) < 40
    assert all(abs(r - 25) <= 3 and abs(c - 25) <= 3 for r, c in in_a)


def test_set_weight_scales_how_often_a_sets_pixels_are_drawn(tmp_path):
    a = np.ones((10, 10), np.uint8)  # same class, same area: 50/50 at equal weights
    index = class_index([_item(a), dataclasses.replace(_item(a), weight=0.25)],
                        np.random.default_rng(0))
    rng = np.random.default_rng(3)
    draws = [sample_center(index, np.array([1.0]), 0, rng)[0] for _ in range(2000)]
    assert np.mean(np.array(draws) == 1) == pytest.approx(0.2, abs=0.03)  # 0.25 / 1.25
    index = write_pairs(tmp_path / "p", n_train=2, n_val=1)
    text = tiny_config_text(index).replace('kind = "pairs"', 'kind = "pairs"\nweight = 0.5')
    (tmp_path / "c.toml").write_text(text)
    data = build_data(load_config(tmp_path / "c.toml"))
    assert {it.weight for it in data.train + data.val} == {0.5}
    (tmp_path / "c.toml").write_text(text.replace("weight = 0.5", "weight = 0"))
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_config(tmp_path / "c.toml")


def test_sparse_dense_ratio():
    dense, sparse = _item(np.ones((40, 40))), _item(np.full((40, 40), 2), "sparse")
    sampler = Sampler([dense, sparse], patch_px=16, jitter_px=0, sparse_dense_ratio=4.0,
                      class_weights=None, augment_cfg=None, rng=np.random.default_rng(0))
    kinds = [k for k, *_ in sampler.centers(2000, np.random.default_rng(3))]
    assert kinds.count("sparse") / len(kinds) == pytest.approx(0.8, abs=0.03)
    images, labels = sampler.batch(3, np.random.default_rng(0))
    assert images.shape == (3, 3, 16, 16) and labels.shape == (3, 16, 16)


def test_extract_pads_outside_with_unannotated():
    img, lab = extract(_item(np.ones((10, 10))), 0, 0, 8)
    assert lab[:4, :4].sum() == 0 and lab[4:, 4:].all()
    assert (img[:4, :4] == 255).all()


def test_validation_set_is_fixed_and_whole_images_when_they_fit():
    items = [_item(np.ones((12, 12))), _item(np.full((16, 10), 2))]
    x, y = validation_set(items, patch_px=16, n_patches=5, seed=0)
    assert x.shape == (2, 3, 16, 16) and (y[0] == 1).sum() == 144 and (y[1] == 2).sum() == 160
    big = [_item(np.ones((64, 64)))]
    a = validation_set(big, patch_px=16, n_patches=5, seed=0)
    b = validation_set(big, patch_px=16, n_patches=5, seed=0)
    assert a[0].shape[0] == 5 and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="no validation items"):
        validation_set([], patch_px=16, n_patches=5, seed=0)


def test_ebhi_config_loads_real_pairs():
    if not EBHI_INDEX.is_file():
        pytest.skip(f"EBHI-Seg subset not found at {EBHI_INDEX} (shared data beside the checkout)")
    from pathlib import Path
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "ebhi-seg.toml"
    cfg = load_config(config, ["data.sets.limit=3", f'data.sets.index="{EBHI_INDEX.as_posix()}"'])
    with build_data(cfg) as data:
        assert len(data.train) == 3 and len(data.val) == 3
        values = {int(v) for it in data.train + data.val for v in np.unique(it.labels)}
        assert values <= {1, 2, 3} and 3 in values    # tumour / healthy glands / other


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\nclasses = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    index = write_pairs(tmp_path / "p", n_train=1, n_val=1)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    with pytest.raises(ConfigError, match="unknown key train.learning_rate"):
        load_config(tmp_path / "c.toml", ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(tmp_path / "c.toml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="'tumor' is used in the config but not listed"):
        load_config(tmp_path / "c.toml", ['model.tumour_classes=["tumor"]'])
    with pytest.raises(ConfigError, match="patch_px 30 must be a multiple of 4.*use 32"):
        load_config(tmp_path / "c.toml", ["data.patch_px=30"])
    with pytest.raises(ConfigError, match="write section.key=value"):
        load_config(tmp_path / "c.toml", ["lr=1"])


def test_paper_config_has_the_papers_classes_and_schedule():
    from pathlib import Path

    from wsiseg.contract import PAPER_CLASSES
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "paper-13class.toml"
    cfg = load_config(config)
    assert list(cfg.model.classes) == [c.name for c in PAPER_CLASSES]
    assert (cfg.model.width, cfg.model.depth, cfg.data.patch_px, cfg.data.mpp) == (32, 5, 384, 1.0)
    assert (cfg.train.lr, cfg.train.lr_patience, cfg.train.batch_size) == (1e-5, 10, 8)
    assert (cfg.train.epochs, cfg.train.iterations, cfg.data.sparse_dense_ratio) == (300, 750, 4.0)
    assert {s.annotation for s in cfg.data.sets} == {"sparse", "dense"}


def test_a_mapping_can_ask_for_the_image(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=1, n_val=0)

    def by_brightness(mask, row, image):
        return np.where(image.mean(axis=2) > 150, 1, 2).astype(np.uint8)
    by_brightness.needs_image = True
    (item,) = load_pairs(index, by_brightness)
    assert set(np.unique(item.labels)) <= {1, 2}
    assert np.array_equal(item.labels == 1, item.image.mean(axis=2) > 150)


def test_teacher_flags_only_whole_context_patches_of_teacher_sets():
    a = np.ones((40, 40), np.uint8)
    taught = dataclasses.replace(_item(a), teacher=True)
    def sampler(items, **kw):
        return Sampler(items, patch_px=16, jitter_px=0, sparse_dense_ratio=1.0,
                       class_weights=None, augment_cfg=None, rng=np.random.default_rng(0), **kw)
    teach = sampler([taught]).batch_with_teacher(6, np.random.default_rng(1)).teach
    assert teach.tolist() == [True] * 6
    teach = sampler([_item(a)]).batch_with_teacher(6, np.random.default_rng(1)).teach
    assert not teach.any()
    teach = sampler([taught], island_p=1.0, island_px=(8, 12),
                    background=1).batch_with_teacher(6, np.random.default_rng(1)).teach
    assert not teach.any()
    teach = sampler([taught], mosaic_p=0.5).batch_with_teacher(
        400, np.random.default_rng(1)).teach
    assert 0.4 < teach.mean() < 0.6
    # the flags draw no random numbers: batch() gives the same patches as before
    s = sampler([taught], mosaic_p=0.5)
    x1, y1 = s.batch(5, np.random.default_rng(7))
    x2, y2, _, shown, inside = s.batch_with_teacher(5, np.random.default_rng(7))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(shown, x1)
    assert inside.all()


def test_teacher_can_be_shown_the_patch_before_its_colour_augmentation():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (48, 48, 3), dtype=np.uint8)
    labels = np.zeros((48, 48), np.uint8)            # centres >= 8 px inside: no padding
    labels[8:40, 8:24] = 1
    labels[8:40, 24:40] = 2
    plain = Item(image=image, labels=labels, annotation="dense", name="a")
    taught = dataclasses.replace(plain, name="b", teacher=True)
    strong = AugmentConfig(elastic=False, rotate=False, blur=False, probability=1.0, lab=True,
                           lab_probability=1.0, lab_a_target=(10.0, 10.0),
                           lab_b_target=(30.0, 30.0))
    def sampler(items, original):
        return Sampler(items, patch_px=16, jitter_px=0, sparse_dense_ratio=1.0,
                       class_weights=None, augment_cfg=strong, rng=np.random.default_rng(0),
                       teacher_original_colour=original)
    same = sampler([taught], False).batch_with_teacher(8, np.random.default_rng(3))
    orig = sampler([taught], True).batch_with_teacher(8, np.random.default_rng(3))
    # the student's patches and labels do not depend on what the teacher is shown
    for a, b in zip(same[:3], orig[:3]):
        assert np.array_equal(a, b)
    assert np.array_equal(same[3], same[0])
    # shown to the teacher: the source pixels, only flipped / turned like the student's patch
    assert not np.array_equal(orig[3], orig[0])
    sources = {np.ascontiguousarray(np.rot90(p, k)[::fr, ::fc]).tobytes()
               for c in range(33) for r in range(33) for p in [image[r:r + 16, c:c + 16]]
               for k in range(4) for fr in (1, -1) for fc in (1, -1)}
    for patch in orig[3]:
        assert np.ascontiguousarray(patch.transpose(1, 2, 0)).tobytes() in sources
    # patches of sets without a teacher show the student's own (augmented) patch
    other = sampler([plain], True).batch_with_teacher(8, np.random.default_rng(3))
    assert not other[2].any() and np.array_equal(other[3], other[0])


def test_class_stain_changes_the_students_copy_only():
    """The stroma's stain is changed in the student's patch; the teacher is shown the patch as
    the lab stained it (same geometry and colour draws)."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)
    labels = np.ones((48, 48), np.uint8)
    labels[:, 24:] = 2
    taught = Item(image=image, labels=labels, annotation="dense", name="a", teacher=True)
    cfg = AugmentConfig(elastic=False, rotate=False, blur=False, lab=False, probability=1.0,
                        class_stain_p=1.0, class_stain_classes=("stroma",),
                        class_stain_h=(1.4, 1.4), class_stain_e=(2.0, 2.0))
    s = Sampler([taught], patch_px=16, jitter_px=0, sparse_dense_ratio=1.0, class_weights=None,
                augment_cfg=cfg, rng=np.random.default_rng(0), class_stain_values=(2,))
    b = s.batch_with_teacher(16, np.random.default_rng(4))
    student = b.images.transpose(0, 2, 3, 1).astype(int)
    shown = b.shown.transpose(0, 2, 3, 1).astype(int)
    stroma = b.labels == 2
    assert stroma.any() and (~stroma).any() and b.teach.all()
    assert (student[stroma].sum(-1) < shown[stroma].sum(-1)).mean() > 0.95   # darker
    far = np.array([ndi.distance_transform_edt(~m) > 4 for m in stroma])
    assert far.any() and np.array_equal(student[far], shown[far])
    with pytest.raises(ValueError, match="class_stain_p > 0"):
        Sampler([taught], patch_px=16, jitter_px=0, sparse_dense_ratio=1.0, class_weights=None,
                augment_cfg=AugmentConfig(), rng=np.random.default_rng(0),
                class_stain_values=(2,))


def test_mirrored_reads_fold_any_distance_back_into_the_image():
    # -9 ... 12 over a 4-pixel axis: ... 1 0 | 0 1 2 3 | 3 2 1 0 | 0 1 ...
    assert mirrored(np.arange(-9, 13), 4).tolist() == [
        0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    item = Item(image=image, labels=np.ones((5, 7), np.uint8), annotation="dense", name="a")
    padded = np.pad(image, ((20, 20), (20, 20), (0, 0)), mode="symmetric")
    for row, col in ((-9, -12), (0, 0), (3, -2), (-20, 6)):
        got = read_region(item, row, col, 18, mirror=True)
        assert np.array_equal(got, padded[row + 20:row + 38, col + 20:col + 38])
        white = read_region(item, row, col, 18)
        inside = np.zeros((18, 18), bool)
        inside[max(-row, 0):5 - row, max(-col, 0):7 - col] = True
        assert np.array_equal(got[inside], white[inside]) and (white[~inside] == 255).all()


def test_teacher_can_be_shown_the_crop_mirrored_beyond_its_edge():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (24, 24, 3), dtype=np.uint8)
    labels = np.ones((24, 24), np.uint8)             # every pixel annotated: 0 = outside
    taught = Item(image=image, labels=labels, annotation="dense", name="a", teacher=True)
    pixelwise = AugmentConfig(elastic=False, rotate=False, blur=False, hed=False, contrast=False,
                              lab=False, probability=1.0)
    def batch(mirror, augment):
        s = Sampler([taught], patch_px=16, jitter_px=8, sparse_dense_ratio=1.0,
                    class_weights=None, augment_cfg=augment, rng=np.random.default_rng(0),
                    teacher_mirror_edge=mirror)
        return s.batch_with_teacher(32, np.random.default_rng(5))
    for augment in (None, pixelwise):
        glass, mirror = batch(False, augment), batch(True, augment)
        for a, b in zip(glass[:3], mirror[:3]):      # the student's patches and labels as before
            assert np.array_equal(a, b)
        student, lab, shown = mirror[0].transpose(0, 2, 3, 1), mirror[1], mirror[3]
        shown = shown.transpose(0, 2, 3, 1)
        outside = lab == 0
        assert outside.any() and (~outside).any()
        # inside the crop the teacher sees the student's pixels (same colour draws), outside
        # tissue where the student sees white; the teacher's calls there are no target
        assert np.array_equal(shown[~outside], student[~outside])
        assert (student[outside] == 255).all() and (shown[outside] < 255).any(axis=-1).all()
        assert np.array_equal(mirror.inside, ~outside) and glass.inside.all()
    # without augmentation the teacher's copy is the crop mirrored at its edges, exactly
    padded = np.pad(image, ((16, 16), (16, 16), (0, 0)), mode="symmetric")
    windows = {padded[r:r + 16, c:c + 16].tobytes() for r in range(41) for c in range(41)}
    for patch in batch(True, None)[3]:
        assert np.ascontiguousarray(patch.transpose(1, 2, 0)).tobytes() in windows


def test_set_overrides_reach_every_set_or_one(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=2, n_val=1)
    text = tiny_config_text(index)
    two = text.replace("[train]", "[[data.sets]]\n" + text.split("[[data.sets]]\n")[1]
                       .split("[train]")[0] + "[train]")
    (tmp_path / "two.toml").write_text(two)
    cfg = load_config(tmp_path / "two.toml", ["data.sets.1.weight=0.5"])
    assert [s.weight for s in cfg.data.sets] == [1.0, 0.5]
    cfg = load_config(tmp_path / "two.toml", ["data.sets.weight=0.5"])
    assert [s.weight for s in cfg.data.sets] == [0.5, 0.5]
    with pytest.raises(ConfigError, match="the config has 2 data sets"):
        load_config(tmp_path / "two.toml", ["data.sets.2.weight=0.5"])
    with pytest.raises(ConfigError, match="data.sets.N.key=value"):
        load_config(tmp_path / "two.toml", ["data.sets.x.weight=0.5"])


def test_class_stain_config(tmp_path):
    index = write_pairs(tmp_path / "p", n_train=2, n_val=1)
    (tmp_path / "c.toml").write_text(tiny_config_text(index))
    on = ["augment.class_stain_p=0.5", 'augment.class_stain_classes=["other"]',
          "augment.class_stain_e=[1.0,2.0]"]
    cfg = load_config(tmp_path / "c.toml", on)
    assert cfg.augment.class_stain_classes == ("other",) and cfg.augment.class_stain_e == (1, 2)
    with pytest.raises(ConfigError, match="class 'stroma' is used in the config but not listed"):
        load_config(tmp_path / "c.toml", [*on[:1], 'augment.class_stain_classes=["stroma"]'])
    with pytest.raises(ConfigError, match="class_stain_p needs class_stain_classes"):
        load_config(tmp_path / "c.toml", on[:1])


def test_white_beyond_the_edge_can_be_labelled_background(tmp_path):
    """data.outside_background: the white a patch shows beyond an image pair's edge is
    labelled background (here 5) instead of unannotated; the pixels inside keep their labels and
    the images are the same patches either way."""
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (24, 24, 3), dtype=np.uint8)
    labels = rng.integers(1, 3, (24, 24)).astype(np.uint8)       # every pixel annotated 1 or 2
    item = Item(image=image, labels=labels, annotation="dense", name="a")
    def batch(outside):
        s = Sampler([item], patch_px=16, jitter_px=8, sparse_dense_ratio=1.0,
                    class_weights=None, augment_cfg=None, rng=np.random.default_rng(0),
                    background=5, outside_background=outside)
        return s.batch_with_teacher(32, np.random.default_rng(5))
    plain, labelled = batch(False), batch(True)
    assert np.array_equal(plain.images, labelled.images)
    beyond = plain.labels == 0
    assert beyond.any() and (~beyond).any()
    assert (plain.images.transpose(0, 2, 3, 1)[beyond] == 255).all()
    assert (labelled.labels[beyond] == 5).all()
    assert np.array_equal(labelled.labels[~beyond], plain.labels[~beyond])
    (tmp_path / "c.toml").write_text(tiny_config_text(write_pairs(tmp_path / "p", n_train=2,
                                                                    n_val=1)))
    assert load_config(tmp_path / "c.toml", ["data.outside_background=true",
                                             "model.background=spare"]).data \
        .outside_background
    with pytest.raises(ConfigError, match="outside_background needs model.background"):
        load_config(tmp_path / "c.toml", ["data.outside_background=true", 'model.background=""'])
