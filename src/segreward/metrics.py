"""Segmentation metrics from one statistics core.

Everything here is derived from :func:`confusion_matrix`: per-image ``[N, C, C]`` matrices
(rows = label, columns = prediction) computed with a single ``bincount`` over the whole batch.
Two reductions exist and they disagree, so they are named:

* **dataset-level** (:class:`SegMetric`): sum the matrices over all images, then compute
  IoU per class and average over classes — MMSegmentation's ``IoUMetric`` definition;
* **per-image** (:mod:`segreward.rewards`): compute IoU per class within each image and average
  over the classes present in that image's prediction or label — used as a reward.

Pixels whose label equals ``ignore_index`` are excluded from every count.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from segreward.errors import SegrewardError, require_tensors

__all__ = ["confusion_matrix", "class_stats", "check_labels", "scores_from_confusion", "SegMetric", "all_reduce_cpu"]


def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int | None = 255, what: str = "label") -> None:
    """Raise a :class:`SegrewardError` naming the values in ``target`` that are neither a class id
    (``0..num_classes-1``) nor ``ignore_index`` (``None``: nothing is ignored, e.g. predictions)."""
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        if ignore_index is None:
            raise SegrewardError(f"{what} values {values} are outside 0..{num_classes - 1}; "
                                 f"check num_classes ({num_classes})")
        raise SegrewardError(
            f"{what} values {values} are outside 0..{num_classes - 1} and are not the ignore index "
            f"{ignore_index}; check num_classes ({num_classes}), the ignore index, or the label map"
        )


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise SegrewardError(f"num_classes must be a positive whole number, got {num_classes!r}")
    return int(num_classes)


def _check_whole(values: torch.Tensor, what: str) -> None:
    """Float labels/predictions are accepted only when they hold whole numbers (1.5 is no class)."""
    if values.is_floating_point():
        frac = values != torch.floor(values)
        if bool(frac.any()):
            raise SegrewardError(f"{what} values must be whole class ids; got {values[frac].flatten()[0].item()} "
                                 f"(dtype {values.dtype}); pass integer labels")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255, validate: bool = True) -> torch.Tensor:
    """Per-image confusion matrices ``[N, C, C]`` (rows = label, columns = prediction).

    ``pred`` and ``target`` are integer tensors of the same shape ``[N, ...]``. One ``bincount``
    over the whole batch, no Python loop over images or classes.
    """
    require_tensors("confusion_matrix", pred=pred, target=target)
    if pred.shape != target.shape:
        raise SegrewardError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    if pred.dim() < 1:
        raise SegrewardError("prediction and label need a batch dimension [N, ...]")
    c = _check_num_classes(num_classes)
    if validate:
        _check_whole(target, "label")
        _check_whole(pred, "prediction")
    n, m = pred.shape[0], math.prod(pred.shape[1:])  # not reshape(n, -1): n may be 0
    pred = pred.reshape(n, m).long()
    target = target.reshape(n, m).long()
    # Ignored pixels go to an extra label row ``c`` of their image (sliced off below) instead of
    # being compacted out: fewer full passes over the pixels than masking (this is the hot path
    # of every reward).
    ignored = target == ignore_index
    rows = target.masked_fill(ignored, c)
    if validate:
        # Fast range checks (one pass each); the slow, value-naming check only runs on a failure.
        # A label equal to ``c`` that is not the ignore index shares row ``c``: caught by the count.
        t_lo, t_hi = (int(v) for v in torch.aminmax(rows)) if rows.numel() else (0, 0)
        if t_lo < 0 or t_hi > c:
            check_labels(target, c, ignore_index)
        p_lo, p_hi = (int(v) for v in torch.aminmax(pred)) if pred.numel() else (0, 0)
        if p_lo < 0 or p_hi >= c:
            check_labels(target, c, ignore_index)  # label errors are reported first
            check_labels(pred, c, ignore_index=None, what="prediction")
    offsets = torch.arange(n, device=pred.device).mul_((c + 1) * c).unsqueeze(1)
    index = torch.add(pred, rows, alpha=c).add_(offsets)
    size = n * (c + 1) * c
    counts = torch.bincount(index.reshape(-1), minlength=size)[:size].reshape(n, c + 1, c)
    if validate and t_hi == c and int(counts[:, c].sum()) != int(ignored.sum()):
        check_labels(target, c, ignore_index)
    return counts[:, :c].contiguous()


def sample_confusion(samples: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Confusion matrices ``[K, N, C, C]`` of ``K`` predictions ``samples [K, N, ...]`` of the same
    labels ``target [N, ...]`` (values trusted, as ``confusion_matrix(validate=False)``): the
    labels' rows are computed once, not once per sample, then one ``bincount``."""
    k, n, c = samples.shape[0], samples.shape[1], _check_num_classes(num_classes)
    target = target.reshape(n, -1).long()
    rows = target.masked_fill(target == ignore_index, c).mul_(c)  # ignored pixels: extra row c
    offsets = torch.arange(k * n, device=samples.device).mul_((c + 1) * c).view(k, n, 1)
    index = samples.reshape(k, n, -1) + (rows + offsets)
    size = k * n * (c + 1) * c
    counts = torch.bincount(index.reshape(-1), minlength=size)[:size].view(k, n, c + 1, c)
    return counts[:, :, :c]


def class_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                validate: bool = True):
    """Per-image, per-class ``(intersect, union, pred_area, label_area)``, each ``[N, C]``."""
    cm = confusion_matrix(pred, target, num_classes, ignore_index, validate)
    return _stats_from_confusion(cm)


def _stats_from_confusion(cm: torch.Tensor):
    intersect = torch.diagonal(cm, dim1=-2, dim2=-1)
    label_area = cm.sum(dim=-1)
    pred_area = cm.sum(dim=-2)
    union = pred_area + label_area - intersect
    return intersect, union, pred_area, label_area


def scores_from_confusion(cm: torch.Tensor) -> dict:
    """MMSegmentation's dataset-level scores from a summed ``[C, C]`` matrix.

    ``aAcc`` = correct / labelled pixels; per class ``IoU = I / U``, ``Acc = I / label area``,
    ``Dice = 2 I / (pred area + label area)``; a class with a zero denominator is NaN and left out of
    the mean (``mIoU``, ``mAcc``, ``mDice``). All in percent; ``pixels`` is the number of labelled
    pixels counted.
    """
    cm = cm.double()
    intersect, union, pred_area, label_area = _stats_from_confusion(cm)
    nan = torch.full_like(intersect, float("nan"))
    iou = torch.where(union > 0, intersect / union.clamp_min(1), nan)
    acc = torch.where(label_area > 0, intersect / label_area.clamp_min(1), nan)
    dice_den = pred_area + label_area
    dice = torch.where(dice_den > 0, 2 * intersect / dice_den.clamp_min(1), nan)
    total = label_area.sum()
    a_acc = float(intersect.sum() / total) if total > 0 else float("nan")

    def nanmean(x):
        x = x[~torch.isnan(x)]
        return float(x.mean()) * 100 if x.numel() else float("nan")

    return {
        "aAcc": a_acc * 100,
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "mDice": nanmean(dice),
        "IoU": [float(v) * 100 for v in iou],
        "Acc": [float(v) * 100 for v in acc],
        "Dice": [float(v) * 100 for v in dice],
        "pixels": int(total),
    }


def all_reduce_cpu(t: torch.Tensor) -> torch.Tensor:
    """The sum of a CPU tensor over all processes when ``torch.distributed`` is initialised (moved
    to the current GPU for NCCL and back), else ``t`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    out = t.to(device)
    dist.all_reduce(out)
    return out.cpu()


class SegMetric:
    """Dataset-level aAcc / mIoU / mAcc / mDice (percent) and per-class IoU, like mmseg's ``IoUMetric``.

    ``update(pred, target)`` accumulates one summed confusion matrix; ``compute()`` all-reduces it
    across processes when ``torch.distributed`` is initialised, so every rank gets the same numbers.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names=None):
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        if isinstance(class_names, str):
            raise SegrewardError(f"SegMetric(class_names={class_names!r}): give a list of {self.num_classes} names, "
                                 "not one string")
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise SegrewardError(f"SegMetric(class_names=...): {len(self.class_names)} names for num_classes="
                                 f"{self.num_classes}; give one name per class")
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        require_tensors("SegMetric.update", pred=pred, target=target)
        if target.numel() == 0:
            raise SegrewardError(f"SegMetric.update: empty batch (pred {tuple(pred.shape)}, target "
                                 f"{tuple(target.shape)}); skip empty batches")
        if pred.dim() == target.dim() + 1:  # logits [N, C, H, W] given: take the argmax
            pred = pred.argmax(dim=1)
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index).sum(0)
        self.confusion += cm.cpu()

    def compute(self) -> dict:
        out = scores_from_confusion(all_reduce_cpu(self.confusion))
        if self.class_names is not None:
            out["classes"] = list(self.class_names)
        return out


def format_scores(scores: dict, class_names=None) -> str:
    """A small plain-text table of per-class IoU/Acc followed by the means."""
    names = class_names or scores.get("classes") or [str(i) for i in range(len(scores["IoU"]))]
    width = max(len(n) for n in names) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(names, scores["IoU"], scores["Acc"]):
        f = lambda v: "   nan" if math.isnan(v) else f"{v:6.2f}"  # noqa: E731
        lines.append(f"{name:<{width}}{f(iou):>8}{f(acc):>8}")
    lines.append(f"aAcc {scores['aAcc']:.2f}  mIoU {scores['mIoU']:.2f}  mAcc {scores['mAcc']:.2f}  mDice {scores['mDice']:.2f}")
    return "\n".join(lines)
