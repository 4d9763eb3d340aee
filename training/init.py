"""Start a run from the weights of an exported model (``train.init``): fine-tuning.

An ONNX model exported by ``wsiseg-train`` holds each convolution with its batch norm folded
in (weight and bias), and the decoder's upsampling + convolutions folded into transposed
convolutions (unfolded again here). The torch U-Net of the same ``[model]`` section is loaded
from it exactly: each convolution gets the folded weight, and its batch norm becomes the
identity plus the folded bias (scale 1, shift = bias, running mean 0, running variance
1 - eps). With the batch norms' statistics frozen (``train.freeze_norm``) the network then
computes what the ONNX model computes, and fine-tuning moves its weights from there. A ``.pt``
checkpoint is loaded as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .unet import UNet

SKIP = ("mean", "std", "luma")


def convs_in_forward_order(net: UNet) -> list[nn.Sequential]:
    """The (conv, norm, relu) units of the U-Net in the order the forward pass runs them."""
    units = [u for block in net.down for u in block.convs]
    for up_conv, block in zip(net.up_convs, net.up):
        units += [up_conv, *block.convs]
    return units


def load_onnx_weights(model: nn.Module, path: str | Path) -> None:
    """Copy an exported model's weights into ``model`` (a ``build_model`` wrapper whose
    ``.net`` is the U-Net); ValueError when the architectures differ."""
    import onnx

    from wsiseg.graph import unfolded_initializers

    inits = [(k, a) for k, a in unfolded_initializers(onnx.load(str(path)).graph).items()
             if k not in SKIP]
    named = dict(inits)
    net: UNet = model.net  # type: ignore[assignment]
    params = dict(model.named_parameters())
    if all(k in named for k in params):   # nothing folded (norm = none): load by name
        with torch.no_grad():
            for k, p in params.items():
                if tuple(p.shape) != named[k].shape:
                    raise ValueError(f"{path}: {k} is {named[k].shape}, the configured U-Net's "
                                     f"convolution is {tuple(p.shape)}")
                p.copy_(torch.from_numpy(np.array(named[k])))
        return
    folded = [a for n, a in inits if not n.startswith("net.head.")]
    units = convs_in_forward_order(net)
    if len(folded) != 2 * len(units):
        raise ValueError(f"{path}: {len(folded) // 2} convolutions, the configured U-Net has "
                         f"{len(units)}; use the [model] section the model was trained with")
    with torch.no_grad():
        for k, unit in enumerate(units):
            conv, norm = unit[0], unit[1]
            w, b = folded[2 * k], folded[2 * k + 1]
            if tuple(conv.weight.shape) != w.shape:
                raise ValueError(f"{path}: convolution {k} is {w.shape}, the configured U-Net's "
                                 f"is {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.fill_(1.0)
                norm.bias.copy_(torch.from_numpy(np.array(b)))
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0 - norm.eps)
            elif conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(b)))
            else:
                raise ValueError(f"{path}: fine-tuning from ONNX needs norm = batch or none")
        net.head.weight.copy_(torch.from_numpy(np.array(named["net.head.weight"])))
        net.head.bias.copy_(torch.from_numpy(np.array(named["net.head.bias"])))


def freeze_norm_statistics(model: nn.Module) -> None:
    """Batch norms use their running statistics (scale and shift still train); call after
    ``model.train()``."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
