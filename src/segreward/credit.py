"""Exact per-pixel credit for count-based rewards (the local-expectation gradient).

For a factorised policy ``pi(y | x) = prod_i p_i(y_i)`` the gradient of the expected reward is

    grad E[R] = E_y[ sum_i sum_c grad p_i(c) * R(y with y_i := c) ]

(local expectation gradients, Titsias & Lazaro-Gredilla, NeurIPS 2015): each pixel's
alternatives are summed exactly while the other pixels stay at their sampled values. It is
unbiased, and a pixel's term carries none of the other pixels' sampling noise. Subtracting
``R(y)`` changes nothing (``sum_c grad p_i(c) = 0``), so we use the *credit*

    credit_i(c) = R(y with y_i := c) - R(y)

which is 0 for the sampled class and reads as "how much would the reward change if this pixel
said ``c``". The surrogate loss ``-sum_i sum_c p_i(c) * stopgrad(credit_i(c))`` has exactly
this gradient.

Count-based rewards make the credit cheap. Every built-in reward is a ratio of sums over
classes of per-class terms of the counts ``I`` (intersection), ``P`` (predicted area) and
``L`` (label area):

    R = Num / Den,   Num = sum_k a(I_k, P_k, L_k),   Den = sum_k b(I_k, P_k, L_k)

(mIoU: ``a = w I/U``, ``b = w [U > 0]`` with ``U = P + L - I``; Dice: ``a = 2I/(P+L)``,
``b = [P+L > 0]``; pixel accuracy: ``a = I``, ``b = L``). Moving a labelled pixel (label ``t``)
out of its sampled class ``s`` and into ``c != s`` touches two classes only:

    class s:  P_s -= 1,  I_s -= [s == t]        class c:  P_c += 1,  I_c += [c == t]

so the new reward is ``(Num + dA) / (Den + dB)`` with ``dA = da_out(s, s==t) + da_in(c, c==t)``
(and ``dB`` alike), where the four per-class tables ``da_out``/``da_in`` x {hit, miss} are
computed once per group of pixels (an image, or the whole batch). A class entering or leaving
the set of present classes is exactly the change of its ``b`` term. The credit of all C
alternatives of every pixel is then a handful of ``[B, C, H, W]`` tensor operations.

*Scope* -- what one reward is computed over: ``image`` (per-image counts), ``batch`` (the
counts of all images summed: a pixel's credit is its effect on the batch's mIoU, much closer to
the dataset-level mIoU that is evaluated), or ``running`` (batch counts plus discounted counts
of earlier batches, see :class:`segreward.reinforce.ReinforceLoss`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from segreward.errors import SegrewardError
from segreward.metrics import class_stats

__all__ = ["CountReward", "count_form", "counts", "reward_from_counts", "credit_table", "COUNT_REWARDS", "SCOPES"]

SCOPES = ("image", "batch", "running")


def _miou_terms(i: torch.Tensor, p: torch.Tensor, l: torch.Tensor, weight: torch.Tensor | None = None):
    u = p + l - i
    present = u > 0
    a = torch.where(present, i / u.clamp_min(1), torch.zeros_like(i))
    b = present.to(i.dtype)
    if weight is not None:
        w = weight.to(device=i.device, dtype=i.dtype)
        a, b = a * w, b * w
    return a, b


def _dice_terms(i: torch.Tensor, p: torch.Tensor, l: torch.Tensor):
    den = p + l
    present = den > 0
    return torch.where(present, 2 * i / den.clamp_min(1), torch.zeros_like(i)), present.to(i.dtype)


def _accuracy_terms(i: torch.Tensor, p: torch.Tensor, l: torch.Tensor):
    return i, l


@dataclass(frozen=True)
class CountReward:
    """A reward ``R = sum_k a_k / sum_k b_k`` (0 when the denominator is 0) of per-class counts.

    ``parts`` is a tuple of ``(terms, weight)``; several parts form the weighted mean
    ``sum_j w_j R_j / sum_j w_j`` (a weighted sum of built-in rewards). ``terms(I, P, L) -> (a, b)``
    maps count tensors ``[..., C]`` to per-class numerator and denominator terms.
    """

    name: str
    parts: tuple


def _single(name: str, terms: Callable) -> CountReward:
    return CountReward(name, ((terms, 1.0),))


COUNT_REWARDS = ("miou", "weighted_miou", "dice", "pixel_accuracy")


def count_form(spec, num_classes: int, class_weights=None) -> CountReward:
    """The counts form of a reward spec: a built-in name, one of the built-in functions of
    :mod:`segreward.rewards`, or a mapping ``{name: weight}``. Anything else (a user's callable)
    has no counts form and raises a one-line error naming the supported rewards."""
    from segreward import rewards as R

    if isinstance(spec, functools.partial):
        class_weights = spec.keywords.get("class_weights", class_weights)
        spec = spec.func
    by_function = {R.miou: "miou", R.weighted_miou: "weighted_miou", R.dice: "dice", R.pixel_accuracy: "pixel_accuracy"}
    if callable(spec) and spec in by_function:
        spec = by_function[spec]
    if isinstance(spec, Mapping):
        parts = []
        for name, w in spec.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise SegrewardError(f"reward weight {name}: {w!r} is not a number")
            if float(w) < 0:
                raise SegrewardError(f"reward weights must be >= 0, got {name}: {w}")
            parts += [(t, float(w) * tw) for t, tw in count_form(name, num_classes, class_weights).parts]
        if not parts or sum(w for _, w in parts) <= 0:
            raise SegrewardError(f"a weighted sum of rewards needs positive weights, got {dict(spec)}")
        return CountReward("+".join(map(str, spec)), tuple(parts))
    if spec == "miou":
        return _single("miou", _miou_terms)
    if spec == "weighted_miou":
        w = R.class_weight_tensor(class_weights, num_classes)
        return _single("weighted_miou", functools.partial(_miou_terms, weight=w))
    if spec == "dice":
        return _single("dice", _dice_terms)
    if spec == "pixel_accuracy":
        return _single("pixel_accuracy", _accuracy_terms)
    if isinstance(spec, str) and spec not in R.REWARDS:
        raise SegrewardError(f"unknown reward {spec!r}; count rewards: {', '.join(COUNT_REWARDS)} "
                             "(or a mapping {name: weight} of them)")
    if not isinstance(spec, str) and not callable(spec):
        raise SegrewardError(f"reward {spec!r} is not a reward: give one of {', '.join(COUNT_REWARDS)} or a mapping "
                             "{name: weight} of them")
    shown = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
    raise SegrewardError(f"reward {shown!r} has no counts form, which estimator 'local' and scope 'running' need; "
                         f"use one of {', '.join(COUNT_REWARDS)} or a mapping {{name: weight}} of them")


def counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
           validate: bool = False) -> torch.Tensor:
    """Per-image counts ``[N, C, 3]`` (intersection, predicted area, label area; ignored pixels
    excluded) from one ``bincount`` over the batch."""
    inter, _, pred_area, label_area = class_stats(pred, target, num_classes, ignore_index, validate)
    return torch.stack([inter, pred_area, label_area], dim=-1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where ``den`` is 0 (no labelled pixel: the reward carries no signal)."""
    return torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))


def reward_from_counts(form: CountReward, i: torch.Tensor, p: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """``R`` of counts ``[..., C]`` (float), one value per leading index."""
    total = 0
    weight = 0.0
    for terms, w in form.parts:
        a, b = terms(i, p, l)
        total = total + w * _ratio(a.sum(-1), b.sum(-1))
        weight += w
    return total / weight


def _part_tables(terms: Callable, i, p, l, dtype):
    """The per-(group, class) tables of one ratio ``R = Num / Den``: ``(in_miss, in_hit,
    out_miss, out_hit, den)``, each table a pair ``(dA - R dB, dB)`` of ``[G, C]`` in ``dtype`` for
    a pixel entering / leaving a class with / without its label; ``den [G]`` float64."""
    a0, b0 = terms(i, p, l)
    num, den = a0.sum(-1), b0.sum(-1)  # [G]
    r0 = _ratio(num, den)
    one = torch.ones_like(i)

    def change(ii, pp):  # (dA - R dB, dB) per class, for a pixel entering/leaving with these counts
        a, b = terms(ii, pp.clamp_min(0), l)
        db = b - b0
        return ((a - a0) - r0.unsqueeze(-1) * db).to(dtype), db.to(dtype)

    return change(i, p + one), change(i + one, p + one), change(i, p - one), \
        change((i - one).clamp_min(0), p - one), den


def credit_tables(form: "CountReward", group_counts: torch.Tensor, dtype=torch.float32):
    """What the fused credit loop (:mod:`segreward._credit_kernel`) reads for one sample's counts
    ``group_counts [G, C, 3]``: ``(tables [P, 8, G, C], den [P, G], part weights [P])`` in
    ``dtype``, the rows ordered leave-miss/leave-hit numerators, leave-miss/leave-hit denominators,
    enter-miss numerator/denominator, enter-hit numerator/denominator (see :func:`_part_credit`)."""
    gc = group_counts.to(torch.float64)
    i, p, l = gc[..., 0], gc[..., 1], gc[..., 2]
    weight = sum(w for _, w in form.parts)
    tables, dens, ws = [], [], []
    for terms, w in form.parts:
        in_miss, in_hit, out_miss, out_hit, den = _part_tables(terms, i, p, l, dtype)
        tables.append(torch.stack([out_miss[0], out_hit[0], out_miss[1], out_hit[1],
                                   in_miss[0], in_miss[1], in_hit[0], in_hit[1]]))
        dens.append(den.to(dtype))
        ws.append(w / weight)
    return torch.stack(tables), torch.stack(dens), torch.tensor(ws, dtype=dtype)


def _part_credit(terms: Callable, i, p, l, sample, target, valid, group, dtype):
    """Credit ``[B, C, H, W]`` of one ratio ``R = Num / Den`` (``sum a / sum b``).

    ``i, p, l``: float64 counts ``[G, C]`` of the groups; ``group``: ``[B]`` long, the group of
    each image; ``sample``/``target``: ``[B, H, W]`` long (target clamped to a class where ignored).
    With ``dA``/``dB`` the changes of ``Num``/``Den`` caused by one pixel's move,

        R' - R = (Num + dA) / (Den + dB) - Num / Den = (dA - R dB) / (Den + dB),

    which never subtracts two nearly equal rewards (float32 keeps the credit's own precision).
    """
    in_miss, in_hit, out_miss, out_hit, den = _part_tables(terms, i, p, l, dtype)
    bsz, h, w = sample.shape
    c = i.shape[-1]
    hit = sample == target
    flat = (group.view(bsz, 1, 1) * c + sample).flatten()

    def per_pixel(miss_t, hit_t):  # table value of each pixel's sampled class, hit or miss
        return torch.where(hit.flatten(), hit_t.flatten().index_select(0, flat),
                           miss_t.flatten().index_select(0, flat)).view(bsz, 1, h, w)

    # Leaving the sampled class: x = dA_out - R dB_out, y = Den + dB_out, one value per pixel.
    x = per_pixel(out_miss[0], out_hit[0])
    y = per_pixel(out_miss[1], out_hit[1]).add_(den.to(dtype)[group].view(bsz, 1, 1, 1))
    # Ignored pixels are in no count and get no credit: x = 0, y = inf makes every entry 0 below
    # (the alternatives' changes are finite) without a pass over [B, C, H, W].
    invalid = ~valid.unsqueeze(1)
    x.masked_fill_(invalid, 0.0)
    y.masked_fill_(invalid, float("inf"))
    # Entering class c (label miss): three broadcast passes over [B, C, H, W].
    credit = (x + in_miss[0][group].view(bsz, c, 1, 1)).div_(y + in_miss[1][group].view(bsz, c, 1, 1))
    # Entering the label class (hit): one value per pixel, written over the miss value.
    t_flat = (group.view(bsz, 1, 1) * c + target).flatten()
    hit_num = x + in_hit[0].flatten().index_select(0, t_flat).view(bsz, 1, h, w)
    hit_den = y + in_hit[1].flatten().index_select(0, t_flat).view(bsz, 1, h, w)
    credit.scatter_(1, target.unsqueeze(1), hit_num.div_(hit_den))
    return credit


def credit_table(form: CountReward, sample: torch.Tensor, target: torch.Tensor, group_counts: torch.Tensor,
                 group: torch.Tensor | None = None, ignore_index: int = 255, dtype=torch.float32) -> torch.Tensor:
    """``credit[b, c, h, w] = R(sample with pixel (b, h, w) set to c) - R(sample)``.

    ``sample``, ``target``: ``[B, H, W]``; ``group_counts``: ``[G, C, 3]`` counts (I, P, L) of the
    groups the reward is computed over, *including* this sample's own pixels (per image: ``G = B``,
    ``group = arange(B)``; batch: ``G = 1``, ``group = zeros(B)``; the counts may also hold other
    ranks' or earlier batches' pixels). Credit is 0 for the sampled class and for ignored pixels.
    """
    bsz = sample.shape[0]
    if group is None:
        group = torch.arange(bsz, device=sample.device) if group_counts.shape[0] == bsz else \
            torch.zeros(bsz, dtype=torch.long, device=sample.device)
    valid = target != ignore_index
    target = torch.where(valid, target, torch.zeros_like(target)).long()
    sample = sample.long()
    gc = group_counts.to(torch.float64)
    i, p, l = gc[..., 0], gc[..., 1], gc[..., 2]
    credit = None
    weight = sum(w for _, w in form.parts)
    for terms, w in form.parts:
        part = _part_credit(terms, i, p, l, sample, target, valid, group, dtype)
        if len(form.parts) > 1:
            part.mul_(w / weight)
        credit = part if credit is None else credit.add_(part)
    return credit.scatter_(1, sample.unsqueeze(1), 0.0)
