"""segreward's losses as mmseg ``loss_decode`` entries.

A decode head calls every entry of ``loss_decode`` as
``loss(seg_logits, seg_label, weight=None, ignore_index=head.ignore_index)`` with the logits
already resized to the label, stores the result under ``loss.loss_name`` (prefixed
``decode.`` / ``aux.``), and mmengine back-propagates the sum of every logged key that
contains ``loss``. So the wrappers below only (1) accept that call, (2) check that the head
and the loss agree on the number of classes and the ignore index, (3) scale by
``loss_weight``, and (4) put the core loss's diagnostics into mmengine's logs under names
*without* ``loss`` (``reinforce.reward_mean``, ...), which are logged but never summed into
the objective. The math is in :mod:`segreward.reinforce`.

Distributed training: the losses have no parameters, every rank runs the same code path,
and the diagnostics are written to the rank's own ``MessageHub`` (rank 0's is the one saved),
so DDP needs no ``find_unused_parameters``. With ``scope='batch'`` or ``'running'`` the core loss
all-reduces the C x 3 class counts of each sample (every rank calls the loss once per
iteration, so the collectives match), and each rank's credit refers to the global batch.
"""

from __future__ import annotations

import warnings

import torch
from mmengine.logging import MessageHub
from mmseg.registry import MODELS

from segreward import reinforce as _core
from segreward.errors import SegrewardError


class _MMSegLoss:
    """The mmseg calling convention around a core loss (a mixin placed before the core class)."""

    _type_name = ""

    def _init_mmseg(self, loss_weight: float, loss_name: str, log_prefix: str | None) -> None:
        if not isinstance(loss_name, str) or not loss_name.startswith("loss_"):
            raise SegrewardError(f"{self._type_name}: loss_name must start with 'loss_' (mmseg only "
                                 f"back-propagates such keys), got {loss_name!r}")
        if log_prefix is None:
            log_prefix = loss_name[len("loss_"):]
        if not log_prefix or "loss" in log_prefix:
            raise SegrewardError(f"{self._type_name}: the diagnostics prefix {log_prefix!r} (from "
                                 f"loss_name={loss_name!r}) must be non-empty and must not contain 'loss', "
                                 "or mmengine would add the diagnostics to the training loss; "
                                 "set log_prefix='...' in the loss config")
        self.loss_weight = float(loss_weight)
        self._loss_name = loss_name
        self.log_prefix = log_prefix
        self._warned_weight = False

    @property
    def loss_name(self) -> str:
        """The key of this loss in the head's loss dict; mmseg needs it to start with ``loss_``."""
        return self._loss_name

    def forward(self, seg_logits: torch.Tensor, seg_label: torch.Tensor, weight: torch.Tensor | None = None,
                ignore_index: int | None = 255, **kwargs) -> torch.Tensor:
        self._check_call(seg_logits, ignore_index)
        if weight is not None and not self._warned_weight:
            self._warned_weight = True
            warnings.warn(f"{self._type_name} ignores the per-pixel weights of the decode head's sampler "
                          "(e.g. OHEMPixelSampler); other entries of loss_decode still use them", stacklevel=2)
        loss = super().forward(seg_logits, seg_label) * self.loss_weight
        if self.training:
            self._log_diagnostics()
        return loss

    def _check_call(self, seg_logits: torch.Tensor, ignore_index: int | None) -> None:
        channels = seg_logits.shape[1] if seg_logits.dim() == 4 else None
        if channels != self.num_classes:
            raise SegrewardError(
                f"{self._type_name}(num_classes={self.num_classes}) in loss_decode got logits of shape "
                f"{tuple(seg_logits.shape)} from the decode head, i.e. {channels} classes: set num_classes="
                f"{channels} in the loss config (it must equal the head's num_classes; in a config based on "
                "yours: num_classes=_base_.model.decode_head.num_classes)")
        if ignore_index is not None and int(ignore_index) != self.ignore_index:
            raise SegrewardError(
                f"{self._type_name}(ignore_index={self.ignore_index}) sits in a decode head with "
                f"ignore_index={ignore_index}: set ignore_index={ignore_index} in the loss config")

    def _log_diagnostics(self) -> None:
        # mmengine's LogProcessor reports every 'train/<key>' scalar of the current MessageHub
        # and writes it to vis_data/scalars.json as '<key>'.
        hub = MessageHub.get_current_instance()
        for key, value in self.diagnostics.items():
            hub.update_scalar(f"train/{self.log_prefix}.{key}", float(value))


@MODELS.register_module()
class ReinforceLoss(_MMSegLoss, _core.ReinforceLoss):
    """:class:`segreward.reinforce.ReinforceLoss` as an mmseg loss.

    Arguments as the core loss (``num_classes``, ``reward``, ``sampler``, ``k``, ``baseline``,
    ``temperature``, ``normalize``, ``ce_weight``, ``ignore_index``, ``class_weight``, ``estimator``
    (``'sample'`` | ``'local'``: exact per-pixel credit), ``scope`` (``'image'`` | ``'batch'`` |
    ``'running'``), ``momentum`` (running scope), ...) plus
    ``loss_weight`` (scales the loss), ``loss_name`` (default ``loss_reinforce``; logged as
    ``decode.loss_reinforce``) and ``log_prefix`` (default: ``loss_name`` without ``loss_``;
    diagnostics are logged as ``<log_prefix>.reward_mean``, ``.reward_std``, ``.adv_std``,
    ``.greedy_reward``, ``.entropy``; the local estimator logs ``.credit_abs`` and
    ``.credit_label_pos`` instead of ``.adv_std``).
    """

    _type_name = "ReinforceLoss"

    def __init__(self, num_classes: int, reward="miou", sampler="categorical", k: int | None = None,
                 baseline: str = "loo", temperature: float = 1.0, normalize: bool = False, ce_weight: float = 0.0,
                 ignore_index: int = 255, class_weight=None, ema_momentum: float = 0.9, block: int = 16,
                 fraction: float = 0.05, reward_kwargs: dict | None = None, estimator: str | None = None,
                 scope: str | None = None, momentum: float = 0.9, sync: bool = True, loss_weight: float = 1.0,
                 loss_name: str = "loss_reinforce", log_prefix: str | None = None):
        _core.ReinforceLoss.__init__(self, num_classes, reward=reward, sampler=sampler, k=k, baseline=baseline,
                                     temperature=temperature, normalize=normalize, ce_weight=ce_weight,
                                     ignore_index=ignore_index, class_weight=class_weight,
                                     ema_momentum=ema_momentum, block=block, fraction=fraction,
                                     reward_kwargs=reward_kwargs, estimator=estimator, scope=scope,
                                     momentum=momentum, sync=sync)
        self._init_mmseg(loss_weight, loss_name, log_prefix)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss_weight={self.loss_weight}, loss_name={self.loss_name}"


@MODELS.register_module()
class RewardWeightedCELoss(_MMSegLoss, _core.RewardWeightedCELoss):
    """:class:`segreward.reinforce.RewardWeightedCELoss` (the earlier design; a baseline) as an
    mmseg loss. ``loss_name`` defaults to ``loss_rwce``; diagnostics are logged as
    ``rwce.greedy_reward``, ``rwce.weight_mean``, ``rwce.weight_std``."""

    _type_name = "RewardWeightedCELoss"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_weight=None, loss_weight: float = 1.0,
                 loss_name: str = "loss_rwce", log_prefix: str | None = None):
        _core.RewardWeightedCELoss.__init__(self, num_classes, ignore_index=ignore_index, class_weight=class_weight)
        self._init_mmseg(loss_weight, loss_name, log_prefix)
