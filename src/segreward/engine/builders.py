"""Build datasets, losses and optimisers from a :class:`~segreward.engine.config.Config`."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from segreward.engine.config import Config, LossConfig, OptimConfig
from segreward.errors import SegrewardError


def build_data(spec: dict, transform=None):
    """A dataset from a spec ``{"type": NAME, ...keywords}``: ``synthetic`` (in memory), or any
    format of :func:`segreward.data.datasets.build_dataset` (``folder``, ``camvid``, ...)."""
    spec = dict(spec)
    kind = str(spec.pop("type")).lower()
    if kind == "concat":
        return _concat(spec, transform)
    if kind == "synthetic":
        from segreward.data.synthetic import SyntheticDataset
        try:
            ds = SyntheticDataset(transform=transform, **spec)
        except TypeError as e:
            raise SegrewardError(f"dataset 'synthetic': {e}") from None
    else:
        from segreward.data.datasets import DATASETS, build_dataset
        if kind not in DATASETS:  # before the root: a typo in the type is the real problem
            raise SegrewardError(f"unknown dataset type {kind!r}; known: {', '.join(['concat', 'synthetic', *DATASETS])}")
        root = spec.pop("root", None)
        if root is None:
            raise SegrewardError(f"dataset {kind!r} needs a 'root' folder")
        split = spec.pop("split", None)
        if transform is not None:
            spec["transform"] = transform
        ds = build_dataset(kind, root, split, **spec)
    if len(ds) == 0:
        raise SegrewardError(f"dataset {kind!r} ({spec}) is empty: no images found")
    return ds


def _concat(spec: dict, transform):
    """``{"type": "concat", "parts": [spec, ...]}``: several datasets with the same classes as one
    (e.g. a few target images plus source images replayed against forgetting)."""
    parts = spec.pop("parts", None)
    if spec:
        raise SegrewardError(f"dataset 'concat' takes only 'parts', got also {sorted(spec)}")
    if not isinstance(parts, list) or not parts:
        raise SegrewardError("dataset 'concat' needs a non-empty list 'parts' of dataset specs")
    datasets = [build_data(p, transform) for p in parts]
    infos = [dataset_info(d) for d in datasets]
    if any(i[0] != infos[0][0] for i in infos):
        raise SegrewardError(f"dataset 'concat': parts have different numbers of classes {[i[0] for i in infos]}")
    out = torch.utils.data.ConcatDataset(datasets)
    out.meta = getattr(datasets[0], "meta", None)
    out.classes, out.ignore_index = infos[0][2], infos[0][1]
    return out


def dataset_info(ds) -> tuple[int, int, list[str]]:
    """``(num_classes, ignore_index, class_names)`` of a dataset."""
    meta = getattr(ds, "meta", None)
    classes = list(getattr(meta, "classes", None) or getattr(ds, "classes", []))
    ignore = int(getattr(meta, "ignore_index", getattr(ds, "ignore_index", 255)))
    if not classes:
        raise SegrewardError("cannot tell the number of classes of the training data; set model.num_classes")
    return len(classes), ignore, classes


def read_class_weight(value, num_classes: int):
    """Class weights from a list, or from a JSON file written by ``segreward stats weights``."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        from segreward.stats import load_class_weights
        return load_class_weights(value, num_classes)  # errors name the file
    try:
        weights = [float(v) for v in value]
    except (TypeError, ValueError):
        raise SegrewardError(f"class weights {value!r} must be a list of numbers or a weights.json path") from None
    bad = [w for w in weights if not (0 <= w < float("inf"))]
    if bad:
        raise SegrewardError(f"class weights must be finite and >= 0, got {bad[0]} in {weights}")
    if len(weights) != num_classes:
        raise SegrewardError(f"class weights have {len(weights)} entries but the model has {num_classes} classes")
    return weights


def autocast(device: torch.device, amp: str):
    """The forward pass's mixed-precision context of ``train.amp`` (``none``: a no-op)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits upsampled bilinearly to ``size`` (the label's), or returned as they are."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class CrossEntropy(nn.Module):
    """Cross-entropy with optional class weights; logits are upsampled to the label size."""

    def __init__(self, class_weight=None, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("class_weight", None if class_weight is None else torch.tensor(class_weight),
                             persistent=False)
        self.diagnostics: dict[str, float] = {}

    def forward(self, logits, target):
        logits = resize_logits(logits, target.shape[-2:])
        if not bool((target != self.ignore_index).any()):
            # No labelled pixel (all ignored, or every pseudo-label below the threshold): the mean
            # over no pixel is NaN; such a batch contributes nothing, with a graph for backward().
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=self.class_weight, ignore_index=self.ignore_index)


class LovaszPlusCE(nn.Module):
    """Lovász-softmax + ``ce_weight`` x cross-entropy (``loss.type=lovasz`` with ``loss.ce_weight``,
    the common 1:1 practice); logs both parts."""

    def __init__(self, lovasz: nn.Module, ce_weight: float, ignore_index: int = 255):
        super().__init__()
        self.lovasz, self.ce, self.ce_weight = lovasz, CrossEntropy(None, ignore_index), float(ce_weight)
        self.diagnostics: dict[str, float] = {}

    def forward(self, logits, target):
        lz, ce = self.lovasz(logits, target), self.ce(logits, target)
        self.diagnostics = {"part_lovasz": float(lz.detach()), "part_ce": float(ce.detach())}
        return lz + self.ce_weight * ce


def build_loss(cfg: Config, num_classes: int, ignore_index: int) -> tuple[nn.Module, str]:
    """The loss module of the run and the name it is logged under (``loss_ce``, ...)."""
    lc: LossConfig = cfg.loss
    class_weight = read_class_weight(lc.class_weight, num_classes)
    kind = cfg.loss_type
    if kind == "ce":
        return CrossEntropy(class_weight, ignore_index), "loss_ce"
    if kind == "lovasz":
        if class_weight is not None:
            raise SegrewardError("loss.class_weight is not used by loss.type=lovasz (it averages the per-class "
                                 "Jaccard surrogates equally); remove it or use loss.type=ce")
        from segreward.lovasz import LovaszSoftmaxLoss
        lovasz = LovaszSoftmaxLoss(ignore_index)  # upsamples the logits to the label size itself
        if lc.ce_weight > 0:
            return LovaszPlusCE(lovasz, lc.ce_weight, ignore_index), "loss_lovasz_ce"
        return lovasz, "loss_lovasz"
    if kind == "reward_weighted_ce":
        from segreward.reinforce import RewardWeightedCELoss
        return RewardWeightedCELoss(num_classes, ignore_index, class_weight), "loss_rwce"
    from segreward.reinforce import ReinforceLoss
    reward_kwargs = {}
    if lc.reward_class_weight is not None:
        reward_kwargs["class_weights"] = read_class_weight(lc.reward_class_weight, num_classes)
    loss = ReinforceLoss(num_classes, reward=lc.reward, sampler=lc.sampler, k=lc.k, baseline=lc.baseline,
                         temperature=lc.temperature, normalize=lc.normalize, ce_weight=lc.ce_weight,
                         ignore_index=ignore_index, class_weight=class_weight, block=lc.block, fraction=lc.fraction,
                         reward_kwargs=reward_kwargs, estimator=lc.estimator, scope=lc.scope, momentum=lc.momentum)
    return loss, "loss_reinforce"


def build_optimizer(params, oc: OptimConfig):
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    if oc.name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay)


def build_scheduler(optimizer, oc: OptimConfig, total_iters: int):
    """Linear warm-up, then constant / poly (power 0.9, mmseg's default) / cosine decay."""

    def factor(step: int) -> float:
        if oc.warmup_iters and step < oc.warmup_iters:
            return (step + 1) / oc.warmup_iters
        progress = min(1.0, step / max(1, total_iters))
        if oc.schedule == "poly":
            return max(0.0, 1 - progress) ** 0.9
        if oc.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
