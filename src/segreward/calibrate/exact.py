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
from segreward.errors import SegrewardError, require_tensors
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
    require_tensors(where, logits=logits, labels=labels)
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
        require_tensors("fit_offsets", logits=logits, labels=labels)
        if labels.numel() == 0:
            raise SegrewardError(f"no images to calibrate on: labels {tuple(labels.shape)} hold no pixel")
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
    from segreward.calibrate.folding import _as_offsets
    return torch.zeros(num_classes, dtype=torch.float64) if init is None else \
        _as_offsets(init, num_classes, what).clone()


def check_settings(max_sweeps, bound) -> None:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise SegrewardError(f"max_sweeps must be a positive integer, got {max_sweeps!r}")
    if bound is not None and not (float(bound) > 0):
        raise SegrewardError(f"bound must be > 0 (or None for no bound), got {bound!r}")


class _Top2:
    """Each row's best and second-best column of ``s [M, C]`` (first maximum on ties, like
    ``argmax``), kept up to date when one column changes: rows where that column was one of the
    two are recomputed, the others compare it with their two."""

    def __init__(self, s: torch.Tensor):
        self.v1, self.i1, self.v2, self.i2 = self._full(s)

    @staticmethod
    def _full(s: torch.Tensor):
        i1 = s.argmax(dim=1)
        v1 = s.gather(1, i1.unsqueeze(1)).squeeze(1)
        rest = s.scatter(1, i1.unsqueeze(1), -float("inf"))
        i2 = rest.argmax(dim=1)
        return v1, i1, rest.gather(1, i2.unsqueeze(1)).squeeze(1), i2

    def without(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(argmax, max)`` of each row over the columns other than ``k``."""
        first = self.i1 == k
        return torch.where(first, self.i2, self.i1), torch.where(first, self.v2, self.v1)

    def update(self, s: torch.Tensor, k: int) -> None:
        x = s[:, k]
        was = (self.i1 == k) | (self.i2 == k)
        above1 = ~was & ((x > self.v1) | ((x == self.v1) & (k < self.i1)))
        above2 = ~was & ~above1 & ((x > self.v2) | ((x == self.v2) & (k < self.i2)))
        self.v2 = torch.where(above1, self.v1, torch.where(above2, x, self.v2))
        self.i2 = torch.where(above1, self.i1, torch.where(above2, k, self.i2))
        self.v1 = torch.where(above1, x, self.v1)
        self.i1 = torch.where(above1, k, self.i1)
        rows = torch.nonzero(was).flatten()
        if rows.numel():
            v1, i1, v2, i2 = self._full(s.index_select(0, rows))
            for name, value in (("v1", v1), ("i1", i1), ("v2", v2), ("i2", i2)):
                getattr(self, name)[rows] = value


def fit_pixels(pixels: PixelSet, form: CountReward, max_sweeps: int = 20, bound: float | None = None,
               init=None, tol: float = 1e-12, progress: bool = False) -> tuple[torch.Tensor, list, bool]:
    """Coordinate ascent on a :class:`PixelSet`: ``(offsets, reward after each sweep, converged)``.

    One sweep visits the classes in order; each step is :func:`line_search` (exact). The reward
    never decreases; the search stops when ``C`` steps in a row change no offset (a step repeated
    with no offset changed since would find the same) or after ``max_sweeps`` sweeps.
    """
    check_settings(max_sweeps, bound)
    z, t, c = pixels.z, pixels.t, pixels.num_classes
    b = check_offsets(init, c)
    label_area = torch.bincount(t, minlength=c).to(torch.float64)
    if c == 1:  # one class: nothing to choose
        return b - b.mean(), [set_reward(form, pixels, b)], True
    s = z + b.to(z)
    top = _Top2(s)
    history, converged = [], False
    bar = tqdm(range(max_sweeps), desc="calibrate", disable=not progress, leave=False)
    cnt = counts_of(top.i1, t, c)  # the prediction as it is (first maximum on ties, like argmax)
    reward_now, unchanged = float(reward_from_counts(form, cnt[:, 0], cnt[:, 1], cnt[:, 2])), 0
    for _ in bar:
        for k in range(c):
            if unchanged >= c:
                break
            src, best_other = top.without(k)
            step = line_search(form, best_other - z[:, k], src, t, k, label_area, float(b[k]), reward_now,
                               bound=bound, tol=tol)
            if step.offset != float(b[k]):
                b[k] = step.offset
                s[:, k] = z[:, k] + b[k]
                top.update(s, k)
                reward_now = step.reward
                unchanged = 0
            else:
                unchanged += 1
        history.append(reward_now)
        bar.set_postfix(reward=f"{reward_now:.4f}", refresh=False)
        if unchanged >= c:
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
        cv = cross_validate(pixels, form, kfold, kfold_seed, progress=progress, max_sweeps=max_sweeps, bound=bound,
                            init=init, tol=tol)
    return Calibration(offsets=b, reward=form.name, reward_before=before, reward_after=set_reward(form, pixels, b),
                       sweeps=len(history), converged=converged, history=history,
                       scores_before=set_scores(pixels, zero), scores_after=set_scores(pixels, b), cv=cv)
