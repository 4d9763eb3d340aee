"""What a teacher model hands a student in training (``train.teacher``): its softmax, averaged
over flipped and turned copies of the patch if asked, as the target of a soft cross-entropy;
mixed with the labels, or replaced by them along the lines between labelled classes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi


def teacher_outputs(teacher: torch.nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The teacher's logits for ``x`` [N, 3, H, W]; with ``tta`` "flips" or "dihedral", the log of
    its softmax averaged over 4 or 8 flipped / transposed copies of the input, each output
    turned back to the input's orientation (a logit vector, so ``teacher_loss`` takes either)."""
    if tta == "none":
        return teacher(x)
    transposes = (False, True) if tta == "dihedral" else (False,)
    total = None
    for tr in transposes:
        for dims in ((), (-1,), (-2,), (-2, -1)):
            t = x.transpose(-1, -2) if tr else x
            t = t.flip(dims) if dims else t
            y = teacher(t).float().softmax(dim=1)
            y = y.flip(dims) if dims else y
            y = y.transpose(-1, -2) if tr else y
            total = y if total is None else total + y
    return (total / (4 * len(transposes))).clamp_min(1e-12).log()


def label_edges(labels: np.ndarray, px: float) -> np.ndarray:
    """Labelled pixels of ``labels`` [N, H, W] (0 = unannotated) within ``px`` pixels of a
    pixel labelled with another class: the band along the annotation's lines between classes."""
    out = np.zeros(labels.shape, dtype=bool)
    for k, lab in enumerate(labels):
        present = [c for c in np.unique(lab) if c]
        if len(present) < 2:
            continue
        for c in present:   # distance of each pixel to the nearest pixel of another class
            out[k] |= (lab == c) & (ndi.distance_transform_edt((lab == 0) | (lab == c)) <= px)
    return out


def teacher_loss(logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor | None = None, label_mix: float = 0.0,
                 mask: torch.Tensor | None = None,
                 label_only: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the model's softmax against the teacher's, averaged over pixels (those
    where ``mask`` [N, H, W] is True, if given; 0 when there are none).

    With ``labels`` (values 1..C, 0 = unannotated) and ``label_mix`` > 0, the target of each
    labelled pixel is ``(1 - label_mix) * teacher + label_mix * one-hot(label)``: the label
    corrects the teacher where it is unsure (with 0.25 the label's class wins wherever the
    teacher's top class leads it by less than a third), without the class balancing of the
    labelled loss; unannotated pixels keep the teacher's target. Where ``label_only`` [N, H, W]
    is True (and the pixel labelled) the target is the label alone."""
    target = teacher_logits.float().softmax(dim=1)
    if labels is not None and (label_mix > 0 or label_only is not None):
        labelled = labels > 0
        onehot = torch.nn.functional.one_hot((labels.long() - 1).clamp(min=0),
                                             target.shape[1]).permute(0, 3, 1, 2).float()
        if label_mix > 0:
            mixed = (1 - label_mix) * target + label_mix * onehot
            target = torch.where(labelled[:, None], mixed, target)
        if label_only is not None:
            target = torch.where((labelled & label_only)[:, None], onehot, target)
    ce = -(target * logits.float().log_softmax(dim=1)).sum(dim=1)
    if mask is None:
        return ce.mean()
    return (ce * mask).sum() / mask.sum().clamp_min(1)
