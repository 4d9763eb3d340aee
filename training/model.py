"""The U-Net of a config, and one filled with a checkpoint's weights.

Shared by the training loop (:mod:`.train`), the export (:mod:`.export`) and the CLI; it imports
neither of them.
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import Config, config_from_saved
from .unet import UNetConfig, build_model


def unet_config(cfg: Config) -> UNetConfig:
    m = cfg.model
    return UNetConfig(n_classes=len(m.classes), width=m.width, depth=m.depth, norm=m.norm,
                      in_channels=1 if m.colour == "grey" else 3)


def make_model(cfg: Config) -> torch.nn.Module:
    return build_model(unet_config(cfg), mean=cfg.model.mean, std=cfg.model.std,
                       colour=cfg.model.colour)


def load_weights(model: torch.nn.Module, state: dict[str, Any], cfg: Config) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError:
        u = unet_config(cfg)
        raise CheckpointError(
            f"the checkpoint's weights do not fit a U-Net of width {u.width}, depth {u.depth}, "
            f"norm {u.norm}, {u.n_classes} classes; use the [model] section it was trained "
            "with, or start a new run folder") from None


def weights_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint stands for: the moving average where it holds one (``last.pt``
    of a run with ``train.ema``: the average is what was validated; ``best.pt`` holds it as its
    weights already), else its weights."""
    return ckpt.get("ema", ckpt["model"])


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Config, torch.nn.Module]:
    """The config a checkpoint (as read by :func:`.checkpoint.load`) was trained with, and its
    U-Net with the checkpoint's weights (:func:`weights_of`)."""
    cfg = config_from_saved(ckpt["config"])
    model = make_model(cfg)
    load_weights(model, weights_of(ckpt), cfg)
    return cfg, model
