"""Patch augmentation: geometry applied to image and labels alike, colour to the image only.

Every transform is switchable and draws from an explicit ``numpy.random.Generator``. Labels
are always resampled with nearest neighbour (order 0), so no new label values appear;
unannotated pixels (0) stay 0, and pixels that a rotation or deformation brings in from outside
the patch become 0 (unannotated) so they never contribute to the loss.

Images are ``[H, W, 3]`` uint8 RGB, labels ``[H, W]`` uint8.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from skimage.color import hed2rgb, hsv2rgb, lab2rgb, rgb2gray, rgb2hed, rgb2hsv, rgb2lab
from skimage.filters import gaussian
from skimage.transform import warp


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    rotate: bool = True
    rotate_deg: float = 15.0             # small rotations, uniform in +-rotate_deg
    elastic: bool = True
    elastic_alpha: float = 8.0           # displacement amplitude in pixels
    elastic_sigma: float = 12.0          # smoothness of the displacement field in pixels
    blur: bool = True
    blur_sigma: float = 1.0              # maximum Gaussian sigma in pixels
    gamma: bool = True
    gamma_range: float = 0.25            # gamma in [1 - r, 1 + r]
    hsv: bool = True
    hue_shift: float = 0.03              # fraction of the hue circle
    saturation: float = 0.15             # saturation scale in [1 - s, 1 + s]
    hed: bool = True
    hed_sigma: float = 0.05              # stain scale and shift jitter per HED channel
    hed_h_range: tuple[float, float] = (1.0, 1.0)  # haematoxylin amount x [lo, hi] (log-uniform)
    hed_e_range: tuple[float, float] = (1.0, 1.0)  # eosin amount x [lo, hi] (log-uniform):
                                         # widens one lab's stain towards paler/pinker ones
    # Where the HED jitter's additive shift lands: "uniform" adds it to every pixel, glass
    # included (a strong jitter then tints glass, which the model learns to call tissue);
    # "tissue" weights it per pixel by its distance from white, 0 at and above the CIELAB
    # lightness hed_shift_white and 1 from 20 L* below it, so glass keeps its colour while the
    # tissue's stain moves (95: pure glass; 83: also the near-white holes that the label rules
    # call background, every channel >= 205).
    hed_shift: str = "uniform"
    hed_shift_white: float = 95.0
    contrast: bool = True
    contrast_range: float = 0.2          # contrast scale in [1 - r, 1 + r]
    # Whole-patch stain transfer in CIELAB (off by default): other labs' H&E differs from one
    # lab's mostly in the mean lightness, redness (a*) and blueness (b*) of the tissue. With
    # probability lab_probability the tissue's mean L*, a*, b* are moved to targets drawn
    # uniformly from these ranges (a Reinhard-style transfer of the means; glass stays white).
    lab: bool = False
    lab_probability: float = 0.5
    lab_l_target: tuple[float, float] = (40.0, 60.0)
    lab_a_target: tuple[float, float] = (20.0, 45.0)
    lab_b_target: tuple[float, float] = (-45.0, -5.0)
    # Stain of chosen classes only (off by default): in one lab's slides stroma may be paler and
    # less eosinophilic than the epithelium, a colour cue that fails on other labs' darker, redder
    # stroma. With probability class_stain_p the haematoxylin and eosin amounts of the pixels
    # labelled with class_stain_classes are scaled by factors drawn log-uniformly from these
    # ranges (a soft-edged mask, applied after the other colour transforms), so that colour alone
    # no longer tells those classes from the rest.
    class_stain_p: float = 0.0
    class_stain_classes: tuple[str, ...] = ()
    class_stain_h: tuple[float, float] = (1.0, 1.0)
    class_stain_e: tuple[float, float] = (1.0, 1.0)
    # Luminance only (off by default): with probability grey_p the patch, after the whole-patch
    # colour transforms, becomes its grey level in all three channels, so that the tissue
    # classes must be told apart by their shapes and textures there, not by one lab's colours.
    # With train.teacher_colour = "original" the teacher still makes its calls in colour.
    grey_p: float = 0.0
    probability: float = 0.5             # chance of each non-trivial transform per patch

    def __post_init__(self) -> None:
        for name in ("hed_h_range", "hed_e_range", "class_stain_h", "class_stain_e"):
            r = getattr(self, name)
            if len(r) != 2 or not 0 < r[0] <= r[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got {list(r)}")
        for name in ("lab_l_target", "lab_a_target", "lab_b_target"):
            r = getattr(self, name)
            if len(r) != 2 or not r[0] <= r[1]:
                raise ValueError(f"{name} must be [low, high] with low <= high, got {list(r)}")
        if self.hed_shift not in ("uniform", "tissue"):
            raise ValueError(f'hed_shift must be "uniform" or "tissue", got {self.hed_shift!r}')
        if not 20 <= self.hed_shift_white <= 100:
            raise ValueError(f"hed_shift_white must be a CIELAB lightness in [20, 100], "
                             f"got {self.hed_shift_white}")
        if not 0 <= self.grey_p <= 1:
            raise ValueError(f"grey_p must be in [0, 1], got {self.grey_p}")
        if not 0 <= self.class_stain_p <= 1:
            raise ValueError(f"class_stain_p must be in [0, 1], got {self.class_stain_p}")
        if self.class_stain_p and not self.class_stain_classes:
            raise ValueError("class_stain_p needs class_stain_classes: the classes whose stain "
                             "is scaled (e.g. [\"desmoplastic stroma\"])")


def _warp_pair(image: np.ndarray, labels: np.ndarray, coords: np.ndarray):
    """Resample image (linear, edge values) and labels (nearest, 0 outside) at coords [2,H,W]."""
    out = np.stack([warp(image[..., c].astype(np.float32), coords, order=1, mode="edge",
                         preserve_range=True) for c in range(image.shape[2])], axis=-1)
    lab = warp(labels, coords, order=0, mode="constant", cval=0, preserve_range=True)
    return out, lab.astype(labels.dtype)


def _grid(shape: tuple[int, int]) -> np.ndarray:
    return np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)


def rotate_coords(shape: tuple[int, int], degrees: float) -> np.ndarray:
    rows, cols = _grid(shape)
    cr, cc = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    t = np.deg2rad(degrees)
    r, c = rows - cr, cols - cc
    return np.stack([cr + np.cos(t) * r - np.sin(t) * c, cc + np.sin(t) * r + np.cos(t) * c])


def elastic_coords(shape: tuple[int, int], alpha: float, sigma: float,
                   rng: np.random.Generator) -> np.ndarray:
    grid = _grid(shape)
    shift = []
    for _ in range(2):
        field = gaussian(rng.uniform(-1, 1, size=shape), sigma=sigma, mode="reflect")
        field /= max(float(np.abs(field).max()), 1e-6)
        shift.append(alpha * field)
    return grid + np.stack(shift).astype(np.float32)


def geometric(image: np.ndarray, labels: np.ndarray, cfg: AugmentConfig,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if cfg.flip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if cfg.flip and rng.random() < 0.5:
        image, labels = image[::-1], labels[::-1]
    if cfg.rot90:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    image, labels = np.ascontiguousarray(image), np.ascontiguousarray(labels)
    warped = False
    if cfg.rotate and rng.random() < cfg.probability:
        coords = rotate_coords(labels.shape, rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        image, labels = _warp_pair(image, labels, coords)
        warped = True
    if cfg.elastic and rng.random() < cfg.probability:
        coords = elastic_coords(labels.shape, cfg.elastic_alpha, cfg.elastic_sigma, rng)
        image, labels = _warp_pair(image, labels, coords)
        warped = True
    if warped:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, labels


def _log_uniform(bounds: tuple[float, float], rng: np.random.Generator) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)


def _restained(hed: np.ndarray, scale: np.ndarray, shift: np.ndarray | float = 0.0
               ) -> np.ndarray:
    """RGB (float32, not clipped) of stain amounts ``hed`` scaled and shifted per channel."""
    return hed2rgb(hed * scale + shift).astype(np.float32)


def photometric(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    p = cfg.probability
    if cfg.blur and rng.random() < p:
        x = gaussian(x, sigma=rng.uniform(0.1, cfg.blur_sigma), channel_axis=-1, mode="reflect")
    if cfg.hed and rng.random() < p:
        hed = rgb2hed(np.clip(x, 0, 1))
        scale = rng.normal(1.0, cfg.hed_sigma, size=3)
        scale[0] *= _log_uniform(cfg.hed_h_range, rng)
        scale[1] *= _log_uniform(cfg.hed_e_range, rng)
        shift = rng.normal(0.0, cfg.hed_sigma, size=3) * np.abs(hed).max(axis=(0, 1))
        if cfg.hed_shift == "tissue":
            shift = shift * tissue_weight(x, cfg.hed_shift_white)[..., None]
        x = _restained(hed, scale, shift)
    if cfg.hsv and rng.random() < p:
        hsv = rgb2hsv(np.clip(x, 0, 1))
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue_shift, cfg.hue_shift)) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation),
                              0, 1)
        x = hsv2rgb(hsv).astype(np.float32)
    if cfg.gamma and rng.random() < p:
        x = np.clip(x, 0, 1) ** rng.uniform(1 - cfg.gamma_range, 1 + cfg.gamma_range)
    if cfg.contrast and rng.random() < p:
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = mean + (x - mean) * rng.uniform(1 - cfg.contrast_range, 1 + cfg.contrast_range)
    if cfg.lab and rng.random() < cfg.lab_probability:
        x = lab_transfer(x, (rng.uniform(*cfg.lab_l_target), rng.uniform(*cfg.lab_a_target),
                             rng.uniform(*cfg.lab_b_target)))
    if cfg.grey_p and rng.random() < cfg.grey_p:
        x = np.repeat(rgb2gray(np.clip(x, 0, 1))[..., None], 3, axis=2).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _lightness_weight(lightness: np.ndarray, white: float = 95.0) -> np.ndarray:
    """0 for glass (L* >= white), 1 for tissue (L* <= white - 20), linear in between."""
    return np.clip((white - lightness) / 20.0, 0, 1).astype(np.float32)


def tissue_weight(x: np.ndarray, white: float = 95.0) -> np.ndarray:
    """Per-pixel weight ``[H, W]`` of RGB ``x`` in [0, 1]: how far each pixel is from white
    (0 on glass, L* >= ``white``; 1 on tissue), the weight by which colour moves leave glass
    alone."""
    return _lightness_weight(rgb2lab(np.clip(x, 0, 1))[..., 0], white)


def lab_transfer(x: np.ndarray, target: tuple[float, float, float]) -> np.ndarray:
    """RGB in [0, 1] whose tissue (L* < 85) has its mean L*, a*, b* moved to ``target``; each
    pixel moves in proportion to how far it is from white, so glass stays near white."""
    lab = rgb2lab(np.clip(x, 0, 1))
    tissue = lab[..., 0] < 85
    if tissue.sum() < 16:
        return x
    shift = np.asarray(target) - lab[tissue].mean(axis=0)
    w = _lightness_weight(lab[..., 0])[..., None]
    lab = lab + w * shift
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(lab)
    return np.clip(rgb, 0, 1).astype(np.float32)


def class_stain(image: np.ndarray, labels: np.ndarray, values: tuple[int, ...],
                scale: tuple[float, float], sigma: float = 1.0) -> np.ndarray:
    """``image [H, W, 3] uint8`` with the haematoxylin and eosin amounts of the pixels labelled
    with any of ``values`` multiplied by ``scale`` (h, e); the mask's edge is blurred by
    ``sigma`` pixels so that no colour step marks the labels' outline. Pixels farther than
    4 ``sigma`` from those labels keep their values exactly."""
    mask = np.isin(labels, values)
    if not mask.any() or scale == (1.0, 1.0):
        return image
    w = gaussian(mask.astype(np.float32), sigma=sigma, mode="nearest")[..., None] if sigma \
        else mask.astype(np.float32)[..., None]
    x = image.astype(np.float32) / 255.0
    out = w * np.clip(_restained(rgb2hed(x), np.array([*scale, 1.0])), 0, 1) + (1 - w) * x
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    touched = w[..., 0] > 0
    return np.where(touched[..., None], out, image)


def draw_class_stain(cfg: AugmentConfig, rng: np.random.Generator
                     ) -> tuple[float, float] | None:
    """The (h, e) scale of one patch, or None (probability 1 - class_stain_p)."""
    if not cfg.class_stain_p or rng.random() >= cfg.class_stain_p:
        return None
    return _log_uniform(cfg.class_stain_h, rng), _log_uniform(cfg.class_stain_e, rng)


def augment(image: np.ndarray, labels: np.ndarray, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies of ``image [H, W, 3] uint8`` and ``labels [H, W]``."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    image, labels = geometric(image, labels, cfg, rng)
    return photometric(image, cfg, rng), labels
