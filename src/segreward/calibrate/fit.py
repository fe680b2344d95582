"""The exact calibration fit as one call: the fit (:mod:`segreward.calibrate.exact`), its scores
before and after, and optionally a k-fold estimate (:mod:`segreward.calibrate.kfold`). Both of
those depend on ``exact`` only; this module sits above them (no import circle)."""

from __future__ import annotations

import torch

from segreward.calibrate.exact import Calibration, PixelSet, confusion_reward, fit_pixels, pixel_set, set_confusion
from segreward.calibrate.kfold import cross_validate
from segreward.calibrate.search import check_count_form
from segreward.metrics import scores_from_confusion

__all__ = ["fit_offsets"]


def fit_offsets(logits, labels, reward="miou", num_classes: int | None = None, ignore_index: int = 255,
                class_weights=None, max_sweeps: int = 20, bound: float | None = None, init=None,
                tol: float = 1e-12, progress: bool = False, kfold: int | None = None,
                kfold_seed: int = 0) -> Calibration:
    """Offsets ``b [C]`` maximising the dataset-level ``reward`` of ``argmax(logits + b)``.

    ``logits [N, C, H, W]`` and ``labels [N, H, W]`` at the same size (or lists of per-image
    maps); ``reward``: any count reward (``miou``, ``weighted_miou`` with ``class_weights``,
    ``dice``, ``pixel_accuracy``, or a mapping ``{name: weight}``), counts summed over all images
    with ``ignore_index`` excluded. ``bound`` limits ``|b_c|`` during the search; the returned
    offsets have mean 0 (only their differences change the argmax). ``kfold=k`` adds a k-fold
    estimate of the gain on unseen images (``cal.cv``, see :mod:`segreward.calibrate.kfold`).
    """
    pixels = logits if isinstance(logits, PixelSet) else pixel_set(logits, labels, num_classes, ignore_index)
    c = pixels.num_classes
    form = check_count_form(reward, c, class_weights)
    start = {} if init is None else None  # the fit starts from the uncalibrated prediction: its confusion
    b, history, converged = fit_pixels(pixels, form, max_sweeps, bound, init, tol, progress, start=start)
    cm_before = start["confusion"] if start else set_confusion(pixels, torch.zeros(c, dtype=torch.float64))
    cm_after = set_confusion(pixels, b)
    cv = None
    if kfold:
        cv = cross_validate(pixels, form, kfold, kfold_seed, progress=progress, max_sweeps=max_sweeps,
                             bound=bound, init=init, tol=tol)
    return Calibration(offsets=b, reward=form.name, reward_before=confusion_reward(form, cm_before),
                       reward_after=confusion_reward(form, cm_after), sweeps=len(history), converged=converged,
                       history=history, scores_before=scores_from_confusion(cm_before),
                       scores_after=scores_from_confusion(cm_after), cv=cv)
