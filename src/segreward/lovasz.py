"""Lovász-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018), written for segreward.

No well-kept implementation installs here without torchvision (pytorch-toolbelt and
segmentation-models-pytorch both require it), so this is our own, from the paper.

For class ``c`` let ``m_i = |1[y_i = c] - p_i(c)|`` be the per-pixel errors. The Jaccard loss
of a set of mispredicted pixels ``M`` is ``D(M) = |M| / |{y = c} ∪ M|``; it is submodular, and
its Lovász extension evaluated at ``m`` (sort ``m`` decreasingly, weight each error by the
increment of ``D`` along the sorted order) is a convex, piecewise-linear surrogate that equals
``1 - IoU_c`` when the predictions are one-hot. The loss averages it over classes present in
the label (``classes="present"``) or over all classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segreward.errors import SegrewardError

__all__ = ["lovasz_grad", "lovasz_softmax", "LovaszSoftmaxLoss"]


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Increments of the Jaccard loss along pixels sorted by decreasing error (``gt_sorted`` in {0, 1})."""
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jac = 1.0 - inter / union
    if gt_sorted.numel() > 1:
        jac = torch.cat([jac[:1], jac[1:] - jac[:-1]])
    return jac


def _flat(probs: torch.Tensor, labels: torch.Tensor, classes: str) -> torch.Tensor:
    if probs.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        err = (fg - probs[:, c]).abs()
        err_sorted, perm = torch.sort(err, descending=True)
        losses.append(torch.dot(err_sorted, lovasz_grad(fg[perm])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, classes: str = "present", per_image: bool = False,
                   ignore_index: int = 255) -> torch.Tensor:
    """Lovász-softmax of class probabilities ``[B, C, H, W]`` against labels ``[B, H, W]``.

    ``per_image`` averages the per-image losses; otherwise all pixels of the batch form one set.
    """
    if classes not in ("present", "all"):
        raise SegrewardError(f"lovasz_softmax: classes must be 'present' or 'all', got {classes!r}")
    if probs.dim() != 4 or labels.dim() != 3 or probs.shape[0] != labels.shape[0] or probs.shape[2:] != labels.shape[1:]:
        raise SegrewardError(f"lovasz_softmax: probabilities {tuple(probs.shape)} and labels {tuple(labels.shape)} "
                             "must be [B, C, H, W] and [B, H, W]")

    def flatten(p, y):
        c = p.shape[0]
        p = p.reshape(c, -1).t()
        y = y.reshape(-1)
        keep = y != ignore_index
        return p[keep], y[keep]

    if per_image:
        return torch.stack([_flat(*flatten(p, y), classes) for p, y in zip(probs, labels)]).mean()
    c = probs.shape[1]
    return _flat(*flatten(probs.transpose(0, 1).reshape(c, -1, probs.shape[-1]), labels.reshape(-1, labels.shape[-1])),
                 classes)


class LovaszSoftmaxLoss(nn.Module):
    """``loss(logits, target)``: Lovász-softmax of ``softmax(logits)`` (upsampled to the label size)."""

    def __init__(self, ignore_index: int = 255, classes: str = "present", per_image: bool = False):
        super().__init__()
        self.ignore_index, self.classes, self.per_image = int(ignore_index), classes, bool(per_image)
        self.diagnostics: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return lovasz_softmax(torch.softmax(logits.float(), dim=1), target.long(), self.classes, self.per_image,
                              self.ignore_index)
