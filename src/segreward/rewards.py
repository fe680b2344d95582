"""Per-image task rewards: ``fn(pred, target) -> Tensor[N]``, higher is better, in ``[0, 1]``.

``pred`` and ``target`` are integer maps ``[N, H, W]``; pixels labelled ``ignore_index`` do not
count. All built-ins come from :func:`segreward.metrics.class_stats` (one ``bincount`` for the
whole batch, so K samples x B images are scored in one call). An image with no labelled pixel
gets reward 0 (it carries no signal: every sample of it scores the same).

Any callable ``fn(pred, target) -> Tensor[N]`` works as a reward without registration; the
built-ins are also reachable by name through :func:`get_reward` (``reward: miou`` in a config).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping, Sequence

import torch

from segreward.errors import SegrewardError
from segreward.metrics import class_stats

__all__ = ["miou", "weighted_miou", "pixel_accuracy", "dice", "weighted_sum", "get_reward", "REWARDS"]

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mean_over_present(score: torch.Tensor, present: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    w = present.to(score.dtype)
    if weight is not None:
        w = w * weight.to(score.dtype)
    den = w.sum(dim=1)
    return torch.where(den > 0, (score * w).sum(dim=1) / den.clamp_min(1e-12), torch.zeros_like(den))


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
         validate: bool = True) -> torch.Tensor:
    """Per-image mIoU in ``[0, 1]``: IoU averaged over the classes present in the image's
    prediction or label (union > 0), ignore pixels excluded."""
    inter, union, _, _ = class_stats(pred, target, num_classes, ignore_index, validate)
    iou = inter.double() / union.clamp_min(1).double()
    return _mean_over_present(iou, union > 0).float()


def class_weight_tensor(class_weights, num_classes: int, device=None) -> torch.Tensor:
    """The class weights of ``weighted_miou`` as a float64 tensor ``[C]``, checked: present, one per
    class, finite and >= 0."""
    if class_weights is None:
        raise SegrewardError("reward 'weighted_miou' needs class_weights (e.g. from `segreward stats weights`)")
    try:
        w = torch.as_tensor(class_weights, dtype=torch.float64, device=device).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise SegrewardError(f"class_weights = {class_weights!r} must be a list of {num_classes} numbers") from None
    if w.numel() != num_classes:
        raise SegrewardError(f"weighted_miou got {w.numel()} class weights for {num_classes} classes")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise SegrewardError(f"class weights must be finite and >= 0, got {w.tolist()}")
    if not bool((w > 0).any()):
        raise SegrewardError(f"class weights are all 0 ({w.tolist()}): the reward would be 0 for every prediction; "
                             "give at least one weight > 0")
    return w


def weighted_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                  class_weights: Sequence[float] | torch.Tensor, ignore_index: int = 255,
                  validate: bool = True) -> torch.Tensor:
    """Per-image class-weighted mIoU: ``sum_c w_c IoU_c / sum_c w_c`` over the present classes.
    Weights such as those of ``segreward stats weights`` make rare classes count more."""
    w = class_weight_tensor(class_weights, num_classes, pred.device)
    inter, union, _, _ = class_stats(pred, target, num_classes, ignore_index, validate)
    iou = inter.double() / union.clamp_min(1).double()
    return _mean_over_present(iou, union > 0, w).float()


def dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
         validate: bool = True) -> torch.Tensor:
    """Per-image mean Dice ``2I / (|pred| + |label|)`` over the present classes."""
    inter, union, pred_area, label_area = class_stats(pred, target, num_classes, ignore_index, validate)
    den = (pred_area + label_area).double()
    d = 2 * inter.double() / den.clamp_min(1)
    return _mean_over_present(d, den > 0).float()


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, **_) -> torch.Tensor:
    """Per-image fraction of labelled pixels predicted correctly."""
    if pred.shape != target.shape:
        raise SegrewardError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    n = pred.shape[0]
    valid = (target != ignore_index).reshape(n, -1)
    correct = ((pred == target).reshape(n, -1) & valid).sum(1).float()
    total = valid.sum(1).float()
    return torch.where(total > 0, correct / total.clamp_min(1), torch.zeros_like(total))


def weighted_sum(rewards: Mapping[RewardFn, float] | Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """``fn(pred, target) = sum_i w_i * fn_i(pred, target) / sum_i w_i`` (stays in [0, 1])."""
    items = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
    total = sum(float(w) for _, w in items)
    if not items or total <= 0:
        raise SegrewardError(f"a weighted sum of rewards needs positive weights, got {[w for _, w in items]}")

    def combined(pred, target):
        return sum(float(w) * fn(pred, target) for fn, w in items) / total

    return combined


REWARDS: dict[str, Callable] = {
    "miou": miou,
    "weighted_miou": weighted_miou,
    "dice": dice,
    "pixel_accuracy": pixel_accuracy,
}


def check_reward_signature(fn: Callable) -> Callable:
    """``fn`` if it can be called as ``fn(pred, target)``; else a one-line error showing its signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return fn
    try:
        sig.bind(None, None)
    except TypeError:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise SegrewardError(f"reward {name}{sig} is not a reward function: it must take (pred, target) and return "
                             "a Tensor[N], one reward per image") from None
    return fn


def register_reward(name: str, fn: Callable) -> Callable:
    """Make ``fn(pred, target, num_classes, ignore_index, **kw)`` reachable by ``name`` in configs."""
    REWARDS[name] = fn
    return fn


def get_reward(spec, num_classes: int, ignore_index: int = 255, **kwargs) -> RewardFn:
    """Resolve a reward spec into ``fn(pred, target) -> Tensor[N]``.

    ``spec`` is a callable (used as is), a built-in name (``miou``, ``weighted_miou`` (needs
    ``class_weights``), ``dice``, ``pixel_accuracy``), or a mapping ``{name: weight}`` for a
    weighted sum, e.g. ``{"miou": 1.0, "pixel_accuracy": 0.5}``.
    """
    # a built-in passed as a function: it needs num_classes too
    spec = next((name for name, fn in REWARDS.items() if spec is fn), spec)
    if callable(spec):
        return check_reward_signature(spec)
    if isinstance(spec, Mapping):
        return weighted_sum([(get_reward(name, num_classes, ignore_index, **kwargs), w) for name, w in spec.items()])
    if not isinstance(spec, str):
        raise SegrewardError(f"reward {spec!r} is not a reward: give a name ({', '.join(sorted(REWARDS))}), a mapping "
                             "{name: weight} or a callable fn(pred, target) -> Tensor[N]")
    if spec not in REWARDS:
        raise SegrewardError(f"unknown reward {spec!r}; valid: {', '.join(sorted(REWARDS))} (or any callable fn(pred, target))")
    fn = REWARDS[spec]
    if spec == "weighted_miou" and kwargs.get("class_weights") is None:
        class_weight_tensor(None, num_classes)  # the one-line error of a missing weight list
    if spec != "weighted_miou":
        kwargs.pop("class_weights", None)
    return functools.partial(fn, num_classes=num_classes, ignore_index=ignore_index, **kwargs)
