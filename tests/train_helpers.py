"""Small fixtures for the training tests: synthetic image/mask pairs and tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.io import imsave

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EBHI_INDEX = SHARED_DATA / "ebhi-seg" / "index.csv"


def write_pairs(folder: Path, n_train: int = 4, n_val: int = 2, size: int = 32,
                seed: int = 0) -> Path:
    """Random-texture images whose bright disc is the mask; returns the index CSV path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,label,class,split"]
    rr, cc = np.mgrid[0:size, 0:size]
    for i in range(n_train + n_val):
        r0, c0 = rng.integers(size // 4, 3 * size // 4, size=2)
        disc = (rr - r0) ** 2 + (cc - c0) ** 2 < (size // 4) ** 2
        image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8) + 100
        image[disc] = image[disc] // 2 + np.array([120, 20, 80], dtype=np.uint8)
        mask = (disc * 255).astype(np.uint8)
        imsave(folder / f"img{i}.png", image, check_contrast=False)
        imsave(folder / f"mask{i}.png", mask, check_contrast=False)
        kind = "A" if i % 2 == 0 else "B"
        rows.append(f"img{i}.png,mask{i}.png,{kind},{'train' if i < n_train else 'val'}")
    index = folder / "index.csv"
    index.write_text("\n".join(rows) + "\n")
    return index


def tiny_config_text(index: Path, **train: object) -> str:
    """A TOML config for a 4-wide, 3-level U-Net on 32 px patches of the pairs at ``index``."""
    train_keys = {"weighting": '"minibatch"', "lr": "1e-3", "epochs": "2", "iterations": "3",
                  "batch_size": "2", "seed": "7", "export": "false", "threads": "1"}
    train_keys.update({k: (f'"{v}"' if isinstance(v, str) else str(v).lower())
                       for k, v in train.items()})
    return "\n".join([
        "[model]",
        'classes = ["disc", "other", "spare"]',
        'tumour_classes = ["disc"]',
        "width = 4", "depth = 3", "border_px = 4",
        "[data]", "patch_px = 32", "jitter_px = 4", "val_patches = 4",
        "[[data.sets]]", 'kind = "pairs"', f'index = "{index.as_posix()}"',
        'mapping = "threshold"', 'foreground = "disc"', 'background = "other"',
        "[train]", *[f"{k} = {v}" for k, v in train_keys.items()], ""])
