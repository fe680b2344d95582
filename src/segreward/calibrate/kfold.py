"""How much of a calibration's gain survives on images it was not fitted on (k-fold by image).

With few labelled images, offsets fitted on them also fit their noise. ``cross_validate`` splits
the images into ``k`` folds, fits on ``k - 1`` and predicts the held-out fold, and pools the
held-out predictions into one dataset-level reward: the estimate of what the offsets fitted on
all images will give on new images of the same kind (a little pessimistic: each fit sees
``(k - 1) / k`` of the data).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from segreward.calibrate.exact import PixelSet, argmax_with_offsets, counts_of, fit_pixels
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError
from segreward.metrics import all_reduce_cpu, confusion_matrix

__all__ = ["cross_validate", "cross_validate_streaming", "fold_of_images"]


def fold_of_images(num_images: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[num_images]`` fold index of each image: a seeded permutation cut into ``k`` near-equal folds."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(num_images, dtype=torch.long)
    fold[perm] = torch.arange(num_images) % k
    return fold


def cross_validate(pixels: PixelSet, form: CountReward, k: int = 5, seed: int = 0, progress: bool = False,
                   **fit_kw) -> dict:
    """``{"k", "reward_before", "reward_after", "gain", "fold_gains", "fold_offsets"}``.

    ``reward_after`` pools the held-out folds' counts, each predicted with the offsets fitted
    without it; ``reward_before`` is the same images uncalibrated; ``fold_gains`` the per-fold
    differences of each held-out fold's own reward. ``progress``: a bar over the ``k`` refits.
    """
    n = pixels.num_images
    k = _check_k(k, n)
    fold = fold_of_images(n, k, seed)[pixels.image]
    c = pixels.num_classes
    zero = torch.zeros(c, dtype=torch.float64)
    pooled_before = torch.zeros(c, 3, dtype=torch.float64)
    pooled_after = torch.zeros(c, 3, dtype=torch.float64)
    gains, offsets = [], []
    for f in tqdm(range(k), desc=f"{k}-fold estimate", disable=not progress, leave=False):
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


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise SegrewardError(f"k-fold estimate: k must be an integer >= 2, got {k!r}")
    if n < 2:
        raise SegrewardError(f"k-fold estimate needs at least 2 labelled images, got {n}")
    return min(k, n)


def _images_of_fold(passes, fold: torch.Tensor, keep_fold: int, held: bool):
    """``passes`` with, from each batch, only the images (in pass order) of fold ``keep_fold``
    (``held``) or of the other folds; empty batches are skipped."""
    def filtered():
        start = 0
        for logits, labels in passes():
            n = labels.shape[0]
            mine = fold[start:start + n] == keep_fold
            start += n
            keep = mine if held else ~mine
            if bool(keep.any()):
                keep = keep.to(labels.device)
                yield logits[keep], labels[keep]
    return filtered


def cross_validate_streaming(passes, num_classes: int, num_images: int, form: CountReward, k: int = 5,
                             seed: int = 0, ignore_index: int = 255, distributed: bool = False, **fit_kw) -> dict:
    """:func:`cross_validate` for streamed data: the same folds of images (by their order in a
    pass, :func:`fold_of_images` over ``num_images``; under DDP each rank folds its own shard), each
    fit by :func:`~segreward.calibrate.stream.fit_offsets_streaming` on the passes without that
    fold, then one pass scoring every held-out image with and without its fold's offsets. Cost:
    ``k`` streaming fits plus one pass (each pass still runs the model on the held-out images).
    Memory stays flat in the number of images."""
    from segreward.calibrate.stream import fit_offsets_streaming
    k = _check_k(k, num_images) if not distributed else max(2, int(k))
    fold = fold_of_images(num_images, k, seed)
    c = num_classes
    offsets = []
    for f in range(k):
        cal = fit_offsets_streaming(_images_of_fold(passes, fold, f, held=False), c, reward=form,
                                    ignore_index=ignore_index, **fit_kw)
        offsets.append(cal.offsets)
    # One pass: each image's counts with zero offsets and with its fold's offsets.
    cms = torch.zeros(k, 2, c, c, dtype=torch.long)
    start = 0
    for logits, labels in passes():
        n = labels.shape[0]
        for f in torch.unique(fold[start:start + n]).tolist():
            keep = (fold[start:start + n] == f).to(labels.device)
            z, y = logits[keep], labels[keep]
            for j, b in enumerate((torch.zeros(c, dtype=torch.float64), offsets[f])):
                pred = (z.to(torch.float64) + b.to(z.device).view(1, c, 1, 1)).argmax(1)
                cms[f, j] += confusion_matrix(pred, y, c, ignore_index, validate=False).sum(0).cpu()
        start += n
    if distributed:
        cms = all_reduce_cpu(cms)
    cnt = cms.to(torch.float64)

    def reward(cm):
        return float(reward_from_counts(form, cm.diagonal(dim1=-2, dim2=-1), cm.sum(-2), cm.sum(-1)))

    gains = [reward(cnt[f, 1]) - reward(cnt[f, 0]) for f in range(k) if cnt[f, 0].sum() > 0]
    rb, ra = reward(cnt[:, 0].sum(0)), reward(cnt[:, 1].sum(0))
    return {"k": k, "seed": seed, "reward_before": rb, "reward_after": ra, "gain": ra - rb, "fold_gains": gains,
            "fold_offsets": [[float(v) for v in b] for b in offsets], "mode": "streaming"}
