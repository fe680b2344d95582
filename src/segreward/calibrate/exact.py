"""In-memory calibration: every labelled pixel's logits held at once, each 1-D step exact.

    cal = fit_offsets(logits, labels, reward="miou")     # logits [N, C, H, W], labels [N, H, W]
    cal.offsets                                          # [C], mean 0
    cal.reward_before, cal.reward_after                  # dataset-level reward, in [0, 1]

Memory: the labelled pixels' logits in float64 (``M x C x 8`` bytes; 41 CamVid frames of 96x128
with 11 classes: 44 MB). For sets that do not fit, :func:`segreward.calibrate.stream.fit_offsets_streaming`
never holds more than one batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from segreward.calibrate.search import check_count_form, line_search
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError
from segreward.metrics import confusion_matrix, scores_from_confusion

__all__ = ["Calibration", "PixelSet", "fit_offsets", "pixel_set", "set_reward", "argmax_with_offsets"]


@dataclass
class Calibration:
    """What a fit found: offsets (mean 0), the reward before/after, per-class scores, history."""

    offsets: torch.Tensor
    reward: str
    reward_before: float
    reward_after: float
    sweeps: int
    converged: bool
    history: list = field(default_factory=list)  # reward after each sweep
    scores_before: dict | None = None  # scores_from_confusion (mIoU, IoU per class, ... in percent)
    scores_after: dict | None = None
    cv: dict | None = None  # k-fold estimate, see segreward.calibrate.kfold
    mode: str = "exact"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["offsets"] = [float(v) for v in self.offsets]
        return out


@dataclass
class PixelSet:
    """The labelled pixels of a set: logits ``z [M, C]`` (float64), labels ``t [M]``, and the
    image each pixel came from (``image [M]``, for k-fold splits)."""

    z: torch.Tensor
    t: torch.Tensor
    image: torch.Tensor
    num_images: int

    @property
    def num_classes(self) -> int:
        return self.z.shape[1]

    def subset(self, images: torch.Tensor) -> "PixelSet":
        keep = torch.isin(self.image, images)
        return PixelSet(self.z[keep], self.t[keep], self.image[keep], self.num_images)


def _check_logits(logits: torch.Tensor, where: str = "logits") -> None:
    if not torch.is_floating_point(logits):
        raise SegrewardError(f"{where} must be a float tensor, got {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise SegrewardError(f"{where} hold {bad} NaN or infinite values; calibrate a model whose outputs are finite")


def flatten_labelled(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     where: str = "logits"):
    """``(z [M, C], t [M], image [M])`` of the labelled pixels of ``logits [N, C, H, W]`` and
    ``labels [N, H, W]`` (or already flat ``[M, C]`` / ``[M]``), with one-line errors for bad input."""
    if logits.dim() == 2:
        logits, labels = logits.t().reshape(1, logits.shape[1], -1, 1), labels.reshape(1, -1, 1)
    if logits.dim() != 4 or labels.dim() != 3:
        raise SegrewardError(f"{where}: expected logits [N, C, H, W] and labels [N, H, W], got shapes "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    n, c, h, w = logits.shape
    if labels.shape != (n, h, w):
        raise SegrewardError(f"{where}: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                             "(resize the logits to the label size first)")
    if c != num_classes:
        raise SegrewardError(f"{where}: logits have {c} classes, expected num_classes={num_classes}")
    if torch.is_floating_point(labels):
        if not bool((labels == labels.round()).all()):
            raise SegrewardError(f"{where}: labels hold fractional values; give integer class ids")
    _check_logits(logits, where)
    labels = labels.long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:10].tolist()
        raise SegrewardError(f"{where}: label values {values} are outside 0..{num_classes - 1} and are not the "
                             f"ignore index {ignore_index}")
    z = logits.permute(0, 2, 3, 1)[valid].to(torch.float64)
    t = labels[valid]
    image = torch.arange(n, device=labels.device).view(n, 1, 1).expand(n, h, w)[valid]
    return z, t, image


def pixel_set(logits, labels, num_classes: int | None = None, ignore_index: int = 255) -> PixelSet:
    """A :class:`PixelSet` from ``logits [N, C, H, W]`` / ``labels [N, H, W]`` tensors, or from
    lists of per-image ``[C, H, W]`` / ``[H, W]`` tensors (sizes may differ between images)."""
    if isinstance(logits, (list, tuple)):
        if len(logits) != len(labels):
            raise SegrewardError(f"got {len(logits)} logit maps but {len(labels)} label maps")
        if not logits:
            raise SegrewardError("no images to calibrate on")
        num_classes = num_classes or logits[0].shape[0]
        parts = [flatten_labelled(z.unsqueeze(0), y.unsqueeze(0), num_classes, ignore_index, f"image {j}")
                 for j, (z, y) in enumerate(zip(logits, labels))]
        z = torch.cat([p[0] for p in parts])
        t = torch.cat([p[1] for p in parts])
        image = torch.cat([torch.full_like(p[1], j) for j, p in enumerate(parts)])
        n = len(parts)
    else:
        num_classes = num_classes or logits.shape[1 if logits.dim() == 4 else -1]
        z, t, image = flatten_labelled(logits, labels, num_classes, ignore_index)
        n = logits.shape[0] if logits.dim() == 4 else 1
    if t.numel() == 0:
        raise SegrewardError(f"no labelled pixel to calibrate on: every label is the ignore index {ignore_index}")
    return PixelSet(z, t, image, n)


def argmax_with_offsets(z: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``argmax_k (z_k + b_k)`` over the last dimension of ``z [M, C]`` (first maximum on ties)."""
    return (z + offsets.to(z)).argmax(dim=-1)


def counts_of(pred: torch.Tensor, t: torch.Tensor, c: int) -> torch.Tensor:
    """``[C, 3]`` float64 counts (intersection, predicted area, label area)."""
    hit = (pred == t).to(torch.float64)
    return torch.stack([torch.bincount(t, weights=hit, minlength=c).to(torch.float64),
                        torch.bincount(pred, minlength=c).to(torch.float64),
                        torch.bincount(t, minlength=c).to(torch.float64)], dim=-1)


def set_reward(form: CountReward, pixels: PixelSet, offsets: torch.Tensor) -> float:
    """The dataset-level reward of the set's argmax prediction under ``offsets``."""
    k = counts_of(argmax_with_offsets(pixels.z, offsets), pixels.t, pixels.num_classes)
    return float(reward_from_counts(form, k[:, 0], k[:, 1], k[:, 2]))


def set_scores(pixels: PixelSet, offsets: torch.Tensor) -> dict:
    """MMSegmentation's dataset-level scores (percent) of the set under ``offsets``."""
    pred = argmax_with_offsets(pixels.z, offsets)
    cm = confusion_matrix(pred.view(1, -1), pixels.t.view(1, -1), pixels.num_classes, validate=False)[0]
    return scores_from_confusion(cm)


def check_offsets(init, num_classes: int, what: str = "init") -> torch.Tensor:
    b = torch.zeros(num_classes, dtype=torch.float64) if init is None else \
        torch.as_tensor(init, dtype=torch.float64).flatten().clone()
    if b.numel() != num_classes:
        raise SegrewardError(f"{what}: {b.numel()} offsets for {num_classes} classes")
    if not bool(torch.isfinite(b).all()):
        raise SegrewardError(f"{what}: offsets must be finite, got {b.tolist()}")
    return b


def check_settings(max_sweeps, bound) -> None:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise SegrewardError(f"max_sweeps must be a positive integer, got {max_sweeps!r}")
    if bound is not None and not (float(bound) > 0):
        raise SegrewardError(f"bound must be > 0 (or None for no bound), got {bound!r}")


def fit_pixels(pixels: PixelSet, form: CountReward, max_sweeps: int = 20, bound: float | None = None,
               init=None, tol: float = 1e-12, progress: bool = False) -> tuple[torch.Tensor, list, bool]:
    """Coordinate ascent on a :class:`PixelSet`: ``(offsets, reward after each sweep, converged)``.

    One sweep visits the classes in order; each step is :func:`line_search` (exact). The reward
    never decreases; the search stops when a sweep changes no offset or after ``max_sweeps``.
    """
    check_settings(max_sweeps, bound)
    z, t, c = pixels.z, pixels.t, pixels.num_classes
    b = check_offsets(init, c)
    label_area = torch.bincount(t, minlength=c).to(torch.float64)
    s = z + b.to(z)
    history, converged = [], False
    bar = tqdm(range(max_sweeps), desc="calibrate", disable=not progress, leave=False)
    reward_now = None
    for _ in bar:
        changed = False
        for k in range(c):
            col = s[:, k].clone()
            s[:, k] = -float("inf")
            src = s.argmax(dim=1)
            best_other = s.gather(1, src.unsqueeze(1)).squeeze(1)
            s[:, k] = col
            # The prediction as it is (first maximum on ties, like argmax) and its reward.
            pred = torch.where((col > best_other) | ((col == best_other) & (src > k)), torch.full_like(src, k), src)
            cnt = counts_of(pred, t, c)
            reward_now = float(reward_from_counts(form, cnt[:, 0], cnt[:, 1], cnt[:, 2]))
            step = line_search(form, best_other - z[:, k], src, t, k, label_area, float(b[k]), reward_now,
                               bound=bound, tol=tol)
            if step.offset != float(b[k]):
                b[k] = step.offset
                s[:, k] = z[:, k] + b[k]
                reward_now = step.reward
                changed = True
        history.append(reward_now)
        bar.set_postfix(reward=f"{reward_now:.4f}", refresh=False)
        if not changed:
            converged = True
            break
    bar.close()
    return b - b.mean(), history, converged


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
    zero = torch.zeros(c, dtype=torch.float64)
    before = set_reward(form, pixels, zero)
    b, history, converged = fit_pixels(pixels, form, max_sweeps, bound, init, tol, progress)
    cv = None
    if kfold:
        from segreward.calibrate.kfold import cross_validate
        cv = cross_validate(pixels, form, kfold, kfold_seed, max_sweeps=max_sweeps, bound=bound, init=init, tol=tol)
    return Calibration(offsets=b, reward=form.name, reward_before=before, reward_after=set_reward(form, pixels, b),
                       sweeps=len(history), converged=converged, history=history,
                       scores_before=set_scores(pixels, zero), scores_after=set_scores(pixels, b), cv=cv)
