"""How much of a calibration's gain survives on images it was not fitted on (k-fold by image).

With few labelled images, offsets fitted on them also fit their noise. ``cross_validate`` splits
the images into ``k`` folds, fits on ``k - 1`` and predicts the held-out fold, and pools the
held-out predictions into one dataset-level reward: the estimate of what the offsets fitted on
all images will give on new images of the same kind (a little pessimistic: each fit sees
``(k - 1) / k`` of the data).
"""

from __future__ import annotations

import torch

from segreward.calibrate.exact import PixelSet, argmax_with_offsets, counts_of, fit_pixels
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError

__all__ = ["cross_validate", "fold_of_images"]


def fold_of_images(num_images: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[num_images]`` fold index of each image: a seeded permutation cut into ``k`` near-equal folds."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(num_images, dtype=torch.long)
    fold[perm] = torch.arange(num_images) % k
    return fold


def cross_validate(pixels: PixelSet, form: CountReward, k: int = 5, seed: int = 0, **fit_kw) -> dict:
    """``{"k", "reward_before", "reward_after", "gain", "fold_gains", "fold_offsets"}``.

    ``reward_after`` pools the held-out folds' counts, each predicted with the offsets fitted
    without it; ``reward_before`` is the same images uncalibrated; ``fold_gains`` the per-fold
    differences of each held-out fold's own reward.
    """
    n = pixels.num_images
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise SegrewardError(f"k-fold estimate: k must be an integer >= 2, got {k!r}")
    if n < 2:
        raise SegrewardError(f"k-fold estimate needs at least 2 labelled images, got {n}")
    k = min(k, n)
    fold = fold_of_images(n, k, seed)[pixels.image]
    c = pixels.num_classes
    zero = torch.zeros(c, dtype=torch.float64)
    pooled_before = torch.zeros(c, 3, dtype=torch.float64)
    pooled_after = torch.zeros(c, 3, dtype=torch.float64)
    gains, offsets = [], []
    for f in range(k):
        held = fold == f
        train = pixels.where(~held)
        if train.t.numel() == 0 or not bool(held.any()):
            continue
        b, _, _ = fit_pixels(train, form, **fit_kw)
        zh, th = pixels.z[held], pixels.t[held]
        before, after = counts_of(argmax_with_offsets(zh, zero), th, c), counts_of(argmax_with_offsets(zh, b), th, c)
        pooled_before += before
        pooled_after += after
        r = [float(reward_from_counts(form, x[:, 0], x[:, 1], x[:, 2])) for x in (before, after)]
        gains.append(r[1] - r[0])
        offsets.append([float(v) for v in b])
    rb, ra = (float(reward_from_counts(form, x[:, 0], x[:, 1], x[:, 2])) for x in (pooled_before, pooled_after))
    return {"k": k, "seed": seed, "reward_before": rb, "reward_after": ra, "gain": ra - rb,
            "fold_gains": gains, "fold_offsets": offsets}
