"""Calibrating from batches of logits, whatever produced them (our trainer, the CLI, mmseg).

``passes()`` returns a fresh iterable of ``(logits [B, C, H, W] at the label size, labels
[B, H, W])`` each time it is called (one call: one pass over the data). :func:`fit_passes`
chooses the mode, collects the labelled pixels (exact) or streams (one pass per sweep).
"""

from __future__ import annotations

import torch

from segreward.calibrate.exact import Calibration, PixelSet, flatten_labelled
from segreward.calibrate.fit import fit_offsets
from segreward.calibrate.stream import fit_offsets_streaming
from segreward.errors import SegrewardError

__all__ = ["MODES", "EXACT_LIMIT", "choose_mode", "collect_pixels", "fit_passes"]

MODES = ("auto", "exact", "streaming")
EXACT_LIMIT = 50_000_000  # labelled pixels x classes held in exact mode by "auto" (400 MB of float64)


def choose_mode(mode: str, values: int | None) -> str:
    """``mode``, with ``auto`` resolved by ``values`` (pixels x classes of the set, if known)."""
    if mode not in MODES:
        raise SegrewardError(f"calibration mode {mode!r} is not valid; choose one of: {', '.join(MODES)}")
    if mode == "auto":
        return "exact" if values is not None and values <= EXACT_LIMIT else "streaming"
    return mode


def collect_pixels(passes, num_classes: int, ignore_index: int = 255) -> PixelSet:
    """One pass of ``passes()`` into a :class:`PixelSet` (every image of every batch its own image)."""
    zs, ts, images, n = [], [], [], 0
    for logits, labels in passes():
        zc, t, image = flatten_labelled(logits, labels, num_classes, ignore_index, where=f"images from {n}",
                                        class_major=True)
        zs.append(zc.cpu())
        ts.append(t.cpu())
        images.append(image.cpu() + n)
        n += labels.shape[0]
    if not ts or sum(t.numel() for t in ts) == 0:
        raise SegrewardError(f"no labelled pixel to calibrate on: every label is the ignore index {ignore_index}")
    # Class-major in the logits' precision: what the fit reads (the float64 rows only if asked for).
    return PixelSet(None, torch.cat(ts), torch.cat(images), n, torch.cat(zs, dim=1))


def fit_passes(passes, num_classes: int, ignore_index: int = 255, mode: str = "auto", values: int | None = None,
               reward="miou", kfold: int | None = 5, bound: float | None = None, max_sweeps: int = 20,
               bins: int = 1024, span: float = 8.0, class_weights=None, distributed: bool = False,
               progress: bool = False) -> tuple[Calibration, PixelSet | None]:
    """``(calibration, pixels)``: exact mode (``pixels`` held) or streaming (``pixels`` None;
    under DDP the histograms are all-reduced, and exact mode is refused: it would need every
    rank's logits). ``kfold``: the k-fold estimate in either mode (streaming: ``k`` more
    streaming fits and one scoring pass, see :func:`~segreward.calibrate.kfold.cross_validate_streaming`)."""
    mode = choose_mode(mode, values)
    if mode == "exact":
        if distributed:
            raise SegrewardError("exact calibration runs on one process; use mode streaming under DDP")
        pixels = collect_pixels(passes, num_classes, ignore_index)
        return fit_offsets(pixels, None, reward=reward, class_weights=class_weights, max_sweeps=max_sweeps,
                           bound=bound, kfold=kfold, progress=progress), pixels
    cal = fit_offsets_streaming(passes, num_classes, reward=reward, ignore_index=ignore_index,
                                class_weights=class_weights, max_sweeps=max_sweeps, bound=bound, bins=bins,
                                span=span, progress=progress)
    if kfold:
        from segreward.calibrate.kfold import cross_validate_streaming
        from segreward.calibrate.search import check_count_form
        cal.cv = cross_validate_streaming(passes, num_classes, cal.num_images, check_count_form(
            reward, num_classes, class_weights), kfold, ignore_index=ignore_index, distributed=distributed,
            bound=bound, max_sweeps=max_sweeps, bins=bins, span=span)
    return cal, None
