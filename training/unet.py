"""The U-Net of Bokhorst et al. 2019, plus the uint8 input wrapper that export uses.

Architecture (paper, section 3 "Training", figure 2b):

- ``depth`` levels (five in the paper); the first has ``width`` filters (32 in the paper) and
  every max-pool doubles the number of filters;
- every block is two 3x3 convolutions (each followed by normalisation, if any, and ReLU) and
  the block's input concatenated to its last feature map (the paper's "skip connections within
  convolutional layers"), so a block with input ``c`` and ``f`` filters outputs ``c + f``
  channels;
- the decoder upsamples (nearest neighbour to the skip's explicit size, which exports cleanly
  to ONNX) and applies a 3x3 convolution instead of a learned transposed convolution,
  concatenates the encoder's feature map of the same level, then applies a block (the
  upsampling + 3x3 convolution is computed as the equivalent transposed convolution with the
  3x3 weights folded: ``upsample_conv``);
- a 1x1 convolution gives C logits; He (Kaiming) initialisation throughout.

The input height and width must be multiples of ``2 ** (depth - 1)`` (16 for five levels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.graph import FOLD_TAPS

NORMS = ("none", "batch", "instance", "group")


@dataclass(frozen=True)
class UNetConfig:
    n_classes: int = 13
    width: int = 32          # filters of the first level (paper: 32)
    depth: int = 5           # number of levels (paper: 5), i.e. depth - 1 max-pools
    norm: str = "none"       # none (paper), batch, instance or group (8 groups)
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.depth < 1 or self.width < 1 or self.n_classes < 1:
            raise ValueError("model.depth, model.width and the number of classes must be >= 1, "
                             f"got depth={self.depth} width={self.width} classes={self.n_classes}")


def size_multiple(depth: int) -> int:
    """Input height and width must be multiples of this."""
    return 2 ** (depth - 1)


def padded_size(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_input_size(height: int, width: int, depth: int) -> None:
    """ValueError naming the size to pad to when height or width is not a valid input size."""
    m = size_multiple(depth)
    if height % m or width % m:
        raise ValueError(f"U-Net input {height}x{width} px: height and width must be multiples "
                         f"of {m} for {depth} levels; pad to "
                         f"{padded_size(height, m)}x{padded_size(width, m)} px")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"),
                         _norm(norm, c_out), nn.ReLU(inplace=True))


class Block(nn.Module):
    """Two 3x3 convolutions; the block's input is concatenated to the last feature map."""

    def __init__(self, c_in: int, filters: int, norm: str) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv(c_in, filters, norm), _conv(filters, filters, norm))
        self.out_channels = c_in + filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.convs(x)], dim=1)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fold = True   # upsampling + conv as one transposed convolution (upsample_conv)
        filters = [cfg.width * 2 ** i for i in range(cfg.depth)]
        self.down = nn.ModuleList()
        c = cfg.in_channels
        skips = []
        for f in filters:
            block = Block(c, f, cfg.norm)
            self.down.append(block)
            c = block.out_channels
            skips.append(c)
        self.up_convs = nn.ModuleList()
        self.up = nn.ModuleList()
        for f, c_skip in zip(reversed(filters[:-1]), reversed(skips[:-1])):
            self.up_convs.append(_conv(c, f, cfg.norm))
            block = Block(f + c_skip, f, cfg.norm)
            self.up.append(block)
            c = block.out_channels
        self.head = nn.Conv2d(c, cfg.n_classes, 1)
        init_he(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            check_input_size(int(x.shape[-2]), int(x.shape[-1]), self.cfg.depth)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up_conv, block, skip in zip(self.up_convs, self.up, reversed(skips[:-1])):
            y = upsample_conv(up_conv, x, skip.shape[-2:], fold=self.fold)
            x = block(torch.cat([skip, y], dim=1))
        return self.head(x)


def upsample_conv(unit: nn.Sequential, x: torch.Tensor, size: torch.Size,
                  fold: bool = True) -> torch.Tensor:
    """``unit`` (conv, norm, relu) on ``x`` upsampled by nearest neighbour to ``size``.

    When ``size`` is twice ``x``'s, as with inputs of the required multiple, the pair runs as
    one transposed convolution of ``x`` with the folded weight (the same result, about 1.5x
    faster to train on the CPU; the parameters stay the 3x3 weights). A traced export, and
    ``fold=False``, keep the plain form (the exporter folds the ONNX graph instead)."""
    conv = unit[0]
    doubled = tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
    if not fold or not doubled or torch.jit.is_tracing():
        return unit(F.interpolate(x, size=size, mode="nearest"))
    a = torch.tensor(FOLD_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    w = torch.einsum("ks,oist,lt->iokl", a, conv.weight, a)
    y = F.conv_transpose2d(x, w.to(x.dtype), conv.bias, stride=2, padding=1)
    for m in unit[1:]:
        y = m(y)
    return y


def init_he(module: nn.Module) -> None:
    """He initialisation (fan-in, ReLU gain) for every convolution; zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


COLOURS = ("rgb", "grey")
LUMA = (0.299, 0.587, 0.114)     # ITU-R BT.601 weights of R, G, B


class Uint8Input(nn.Module):
    """Takes RGB 0-255 (uint8 or float), scales to 0-1 and normalises with mean/std.

    With ``colour = "grey"`` the network sees only the luminance (BT.601 weights of the RGB
    input, normalised with the mean of ``mean`` and ``std``): a model that cannot use hue has to
    tell tissues apart by texture and brightness, which carries over better between labs'
    stains. The input is RGB either way, so the engine's contract is the same.

    Training feeds float tensors with values 0-255; the exported graph takes uint8, so the
    engine passes raw pixels (contract ``input = "uint8"``).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, float, float],
                 std: tuple[float, float, float], colour: str = "rgb") -> None:
        super().__init__()
        if colour not in COLOURS:
            raise ValueError(f"model.colour must be one of {', '.join(COLOURS)}, got {colour!r}")
        self.net = net
        self.grey = colour == "grey"
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        if self.grey:
            m, s = m.mean(dim=1, keepdim=True), s.mean(dim=1, keepdim=True)
        self.register_buffer("mean", m)
        self.register_buffer("std", s)
        self.register_buffer("luma", torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.grey:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        return self.net((x - self.mean) / self.std)


def build_model(cfg: UNetConfig, mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                std: tuple[float, float, float] = (0.25, 0.25, 0.25),
                colour: str = "rgb") -> Uint8Input:
    """``cfg.in_channels`` must be 1 for ``colour = "grey"`` and 3 for ``"rgb"``."""
    want = 1 if colour == "grey" else 3
    if cfg.in_channels != want:
        raise ValueError(f"colour {colour!r} needs in_channels={want}, got {cfg.in_channels}")
    return Uint8Input(UNet(cfg), mean, std, colour)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
