"""Augmentation invariants: labels stay aligned, unannotated stays 0, no new label values."""

import numpy as np
import pytest
from wsiseg_train.augment import (
    AugmentConfig,
    augment,
    class_stain,
    draw_class_stain,
    tissue_weight,
)

OFF = {k: False for k in ("flip", "rot90", "rotate", "elastic", "blur", "gamma", "hsv", "hed",
                          "contrast")}


def _pair(size=48):
    """Image whose red channel encodes the label: labels 1, 2 where red 250 / 120, 0 elsewhere."""
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[5:20, 8:30] = 1
    labels[25:44, 20:40] = 2
    image = np.full((size, size, 3), 30, dtype=np.uint8)
    image[labels == 1, 0] = 250
    image[labels == 2, 0] = 120
    return image, labels


@pytest.mark.parametrize("switch", ["flip", "rot90"])
def test_exact_geometry_keeps_labels_aligned(switch):
    image, labels = _pair()
    cfg = AugmentConfig(**{**OFF, switch: True})
    for seed in range(6):
        img, lab = augment(image, labels, cfg, np.random.default_rng(seed))
        red = img[..., 0]
        assert np.array_equal(lab == 1, red == 250) and np.array_equal(lab == 2, red == 120)
        assert np.bincount(lab.ravel(), minlength=3).tolist() == \
            np.bincount(labels.ravel(), minlength=3).tolist()


@pytest.mark.parametrize("switch", ["rotate", "elastic"])
def test_warps_keep_labels_aligned_and_outside_becomes_unannotated(switch):
    image, labels = _pair()
    labels[labels == 0] = 3           # a fully annotated patch
    cfg = AugmentConfig(**{**OFF, switch: True}, probability=1.0, rotate_deg=30)
    img, lab = augment(image, labels, cfg, np.random.default_rng(1))
    assert set(np.unique(lab)) <= {0, 1, 2, 3}       # nearest neighbour: no new values
    red = img[..., 0].astype(int)
    # away from edges (linear image interpolation blurs boundaries) colour and label agree
    inner1 = (lab == 1) & (np.abs(red - 250) < 60)
    assert inner1.sum() > 0.7 * (lab == 1).sum()
    if switch == "rotate":
        assert lab[0, 0] == 0 and lab[-1, -1] == 0    # corners come from outside the patch


def test_unannotated_stays_zero_and_colour_leaves_labels_alone():
    image, labels = _pair()
    geometry = AugmentConfig(**{**OFF, "flip": True, "rot90": True, "rotate": True,
                                "elastic": True}, probability=1.0)
    for seed in range(4):
        img, lab = augment(image, labels, geometry, np.random.default_rng(seed))
        assert img.dtype == np.uint8 and img.shape == image.shape
        unannotated_colour = img[..., 0] < 40   # only the unannotated region was this dark
        assert (lab[unannotated_colour] == 0).mean() > 0.99
        assert set(np.unique(lab)) <= {0, 1, 2}
    colour_only = AugmentConfig(**{**OFF, "blur": True, "gamma": True, "hsv": True, "hed": True,
                                   "contrast": True}, probability=1.0)
    img, lab = augment(image, labels, colour_only, np.random.default_rng(0))
    assert np.array_equal(lab, labels) and not np.array_equal(img, image)


def test_same_generator_state_same_result():
    image, labels = _pair()
    a = augment(image, labels, AugmentConfig(), np.random.default_rng(5))
    b = augment(image, labels, AugmentConfig(), np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_all_off_is_identity():
    image, labels = _pair()
    img, lab = augment(image, labels, AugmentConfig(**OFF), np.random.default_rng(0))
    assert np.array_equal(img, image) and np.array_equal(lab, labels)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        augment(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), AugmentConfig(),
                np.random.default_rng(0))


def test_stain_ranges_scale_the_eosin_amount():
    """hed_e_range = (2, 2) doubles the eosin concentration and leaves haematoxylin alone."""
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    image = np.stack([rng.integers(150, 230, (32, 32)), rng.integers(60, 140, (32, 32)),
                      rng.integers(150, 220, (32, 32))], axis=-1).astype(np.uint8)
    cfg = AugmentConfig(**{**OFF, "hed": True}, probability=1.0, hed_sigma=0.0,
                        hed_e_range=(2.0, 2.0))
    out = augment(image, np.zeros((32, 32), np.uint8), cfg, np.random.default_rng(0))[0]
    before, after = rgb2hed(image), rgb2hed(out)
    assert after[..., 1].mean() / before[..., 1].mean() == pytest.approx(2.0, rel=0.05)
    assert after[..., 0].mean() / before[..., 0].mean() == pytest.approx(1.0, rel=0.05)
    plain = AugmentConfig(**{**OFF, "hed": True}, probability=1.0, hed_sigma=0.0)
    same = augment(image, np.zeros((32, 32), np.uint8), plain, np.random.default_rng(0))[0]
    assert np.median(np.abs(same.astype(int) - image)) <= 1    # HED round trip: no change


def test_tissue_weighted_hed_shift_keeps_glass_white():
    """A strong HED jitter tints glass when its shift is uniform; weighted by the distance from
    white ("tissue") the glass half stays white while the tissue half's stain still moves."""
    rng = np.random.default_rng(3)
    image = np.full((32, 32, 3), 255, np.uint8)
    image[:, :16] = np.stack([rng.integers(120, 170, (32, 16)), rng.integers(40, 90, (32, 16)),
                              rng.integers(120, 170, (32, 16))], axis=-1)
    labels = np.zeros((32, 32), np.uint8)
    outs = {}
    for mode in ("uniform", "tissue"):
        cfg = AugmentConfig(**{**OFF, "hed": True}, probability=1.0, hed_sigma=0.3,
                            hed_shift=mode)
        outs[mode] = [augment(image, labels, cfg, np.random.default_rng(s))[0].astype(int)
                      for s in range(8)]
    glass = {m: max(np.abs(o[:, 20:] - 255).max() for o in outs[m]) for m in outs}
    tissue = {m: np.mean([np.abs(o[:, :12] - image[:, :12]).mean() for o in outs[m]])
              for m in outs}
    assert glass["uniform"] > 20 and glass["tissue"] <= 1
    assert tissue["tissue"] > 5 and tissue["tissue"] == pytest.approx(tissue["uniform"], rel=0.3)
    with pytest.raises(ValueError, match="hed_shift must be"):
        AugmentConfig(hed_shift="glass")


def test_hed_shift_white_spares_near_white_holes():
    """EBHI's background label takes every channel >= 205 (L* about 83): at the default
    threshold (95) such a pixel still takes most of the shift; with hed_shift_white = 83 none."""
    near_white = np.full((4, 4, 3), 212 / 255, np.float32)      # L* 85
    tissue = np.full((4, 4, 3), [150 / 255, 80 / 255, 150 / 255], np.float32)
    assert tissue_weight(near_white) == pytest.approx(0.5, abs=0.05)
    assert tissue_weight(near_white, 83.0).max() == 0.0
    assert tissue_weight(tissue, 83.0).min() == 1.0
    image = np.full((32, 32, 3), 212, np.uint8)
    image[:, :16] = (150, 80, 150)
    moved = {}
    for white in (95.0, 83.0):
        cfg = AugmentConfig(**{**OFF, "hed": True}, probability=1.0, hed_sigma=0.3,
                            hed_shift="tissue", hed_shift_white=white)
        outs = [augment(image, np.zeros((32, 32), np.uint8), cfg, np.random.default_rng(s))[0]
                for s in range(8)]
        moved[white] = max(np.abs(o[:, 20:].astype(int) - 212).max() for o in outs)
    assert moved[95.0] > 10 and moved[83.0] < moved[95.0] / 2
    with pytest.raises(ValueError, match="hed_shift_white must be"):
        AugmentConfig(hed_shift_white=120)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0,)])
def test_bad_stain_range(bounds):
    with pytest.raises(ValueError, match="hed_e_range must be"):
        AugmentConfig(hed_e_range=bounds)


def test_class_stain_scales_the_chosen_classes_only():
    """Stroma-labelled pixels get (h, e) times their haematoxylin and eosin; pixels farther than
    4 sigma from them keep their values exactly, and the mask's edge is soft."""
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    image = np.stack([rng.integers(150, 230, (40, 40)), rng.integers(60, 140, (40, 40)),
                      rng.integers(150, 220, (40, 40))], axis=-1).astype(np.uint8)
    labels = np.ones((40, 40), np.uint8)
    labels[:, 20:] = 2
    out = class_stain(image, labels, (2,), (1.5, 2.0), sigma=1.0)
    assert np.array_equal(out[:, :15], image[:, :15])
    before, after = rgb2hed(image[:, 25:]), rgb2hed(out[:, 25:])
    assert after[..., 0].mean() / before[..., 0].mean() == pytest.approx(1.5, rel=0.05)
    assert after[..., 1].mean() / before[..., 1].mean() == pytest.approx(2.0, rel=0.05)
    assert out[:, 25:].mean() < image[:, 25:].mean() - 10           # darker
    # soft edge: the eosin gain ramps up across the boundary instead of jumping
    gain = rgb2hed(out)[..., 1].mean(0) / rgb2hed(image)[..., 1].mean(0)
    assert 1.05 < gain[19] < gain[20] < 1.95
    assert np.array_equal(class_stain(image, labels, (3,), (1.5, 2.0)), image)   # absent class
    assert np.array_equal(class_stain(image, labels, (2,), (1.0, 1.0)), image)


def test_class_stain_draws():
    cfg = AugmentConfig(class_stain_p=0.25, class_stain_classes=("stroma",),
                        class_stain_h=(1.0, 1.5), class_stain_e=(2.0, 3.0))
    rng = np.random.default_rng(0)
    draws = [draw_class_stain(cfg, rng) for _ in range(2000)]
    kept = [d for d in draws if d is not None]
    assert 0.2 < len(kept) / len(draws) < 0.3
    h, e = np.array(kept).T
    assert 1.0 <= h.min() and h.max() <= 1.5 and 2.0 <= e.min() and e.max() <= 3.0
    assert draw_class_stain(AugmentConfig(), rng) is None
    with pytest.raises(ValueError, match="class_stain_p needs class_stain_classes"):
        AugmentConfig(class_stain_p=0.5)
    with pytest.raises(ValueError, match="class_stain_p must be in"):
        AugmentConfig(class_stain_p=1.5, class_stain_classes=("stroma",))
    with pytest.raises(ValueError, match="class_stain_e must be"):
        AugmentConfig(class_stain_e=(0.0, 2.0))


def test_grey_p_gives_luminance_only_patches_at_that_rate():
    """grey_p = 1: every patch is grey (three equal channels, dark stays dark); 0.3: about
    that share; 0 (default): colour is kept."""
    image, labels = _pair()
    grey = augment(image, labels, AugmentConfig(**OFF, grey_p=1.0), np.random.default_rng(0))[0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[labels == 1, 0].mean() > grey[labels == 0, 0].mean()   # red 250 brighter than 30
    rng = np.random.default_rng(1)
    share = np.mean([np.ptp(augment(image, labels, AugmentConfig(**OFF, grey_p=0.3), rng)[0],
                            axis=2).max() == 0 for _ in range(400)])
    assert 0.22 < share < 0.38
    kept = augment(image, labels, AugmentConfig(**OFF), np.random.default_rng(2))[0]
    assert np.ptp(kept, axis=2).max() > 0
    with pytest.raises(ValueError, match="grey_p must be"):
        AugmentConfig(grey_p=1.5)
