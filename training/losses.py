"""Weight maps for sparse annotations and the weighted cross-entropy (Bokhorst et al. 2019).

Labels are integer maps ``[N, H, W]``: 0 = unannotated, ``k`` = class ``k`` (output channel
``k - 1``). Every weight map is zero on unannotated pixels (the paper's "mask of valid pixels").

- ``none``: ``w = 1`` on labelled pixels.
- ``instance`` (eq. 1): ``w = L_I / (C_I * C_ij)`` where, within one patch, ``L_I`` is the
  number of labelled pixels, ``C_I`` the number of classes present and ``C_ij`` the number of
  pixels of the pixel's class. Every class present in a patch gets the same total weight.
- ``minibatch`` (eq. 2): the same with the counts taken over the whole batch (``L_B``, ``C_B``).

Normalisation: the loss is ``sum(w * ce) / max(sum(w), 1)``. All three maps sum to the number of
labelled pixels of the batch (``L_B``), so the denominator is the same for all three and the loss
is a weighted mean per labelled pixel: its scale does not depend on how sparse the annotations are,
so one learning rate serves sparse, dense and combined runs. A batch without any labelled pixel
gives a loss of exactly 0 with zero gradient (``0 * ce`` summed, divided by 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTINGS = ("none", "instance", "minibatch")


def _class_counts(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Pixels per label value, ``[N, n_classes + 1]`` (column 0 = unannotated)."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    counts = torch.zeros(n, n_classes + 1, dtype=torch.float64, device=labels.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))


def weight_map(labels: torch.Tensor, n_classes: int, weighting: str = "minibatch") -> torch.Tensor:
    """Per-pixel loss weights ``[N, H, W]`` (float32) for a label batch ``[N, H, W]``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if labels.ndim != 3:
        raise ValueError(f"labels must be [N, H, W], got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > n_classes):
        raise ValueError(f"label values must be 0..{n_classes}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    valid = labels > 0
    if weighting == "none":
        return valid.to(torch.float32)
    counts = _class_counts(labels, n_classes)[:, 1:]              # [N, K]
    if weighting == "minibatch":
        counts = counts.sum(dim=0, keepdim=True).expand_as(counts)
    total = counts.sum(dim=1, keepdim=True)                        # L_I or L_B
    present = (counts > 0).sum(dim=1, keepdim=True)                # C_I or C_B
    per_class = torch.where(counts > 0, total / (present * counts).clamp(min=1), 0.0)
    per_class = torch.cat([torch.zeros_like(total), per_class], dim=1)   # value 0 -> weight 0
    w = torch.gather(per_class, 1, labels.reshape(labels.shape[0], -1).long())
    return w.reshape(labels.shape).to(torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * ce) / max(sum(w), 1)`` with ``logits [N, C, H, W]`` and labels 1..C (0 ignored)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "do not match")
    target = (labels.long() - 1).clamp(min=0)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    w = weights.to(ce.dtype)
    return (w * ce).sum() / w.sum().clamp(min=1.0)


def sparse_loss(logits: torch.Tensor, labels: torch.Tensor,
                weighting: str = "minibatch") -> torch.Tensor:
    """Weighted cross-entropy with the weight map of ``weighting`` computed from ``labels``."""
    return weighted_cross_entropy(logits, labels, weight_map(labels, logits.shape[1], weighting))
