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

from segreward import _numba
from segreward.calibrate import _kernels
from segreward.calibrate.search import _SMALL, SearchWork, bounded_search, check_count_form, line_search_full
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError, require_tensors
from segreward.metrics import confusion_matrix, scores_from_confusion

__all__ = ["Calibration", "PixelSet", "fit_pixels", "pixel_set", "set_reward", "argmax_with_offsets"]


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
    num_images: int | None = None  # images calibrated on (streaming: this process's shard)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["offsets"] = [float(v) for v in self.offsets]
        return out


class PixelSet:
    """The labelled pixels of a set: labels ``t [M]``, the image each pixel came from
    (``image [M]``, for k-fold splits), and their logits, row-major float64 ``z [M, C]`` and/or
    class-major ``zc [C, M]`` in their own precision (what the fit reads, see :meth:`class_major`).
    Either may be given; ``z`` is made from ``zc`` when first read (the fit never needs it)."""

    def __init__(self, z: torch.Tensor | None, t: torch.Tensor, image: torch.Tensor, num_images: int,
                 zc: torch.Tensor | None = None):
        if z is None and zc is None:
            raise SegrewardError("PixelSet needs logits: z [M, C] or zc [C, M]")
        self._z, self.t, self.image, self.num_images, self.zc = z, t, image, num_images, zc

    @property
    def z(self) -> torch.Tensor:
        if self._z is None:
            zc = self.zc
            self._z = torch.empty(zc.shape[1], zc.shape[0], dtype=torch.float64, device=zc.device).copy_(zc.t())
        return self._z

    @property
    def num_classes(self) -> int:
        return self.zc.shape[0] if self.zc is not None else self._z.shape[1]

    def subset(self, images: torch.Tensor) -> "PixelSet":
        return self.where(torch.isin(self.image, images))

    def where(self, keep: torch.Tensor) -> "PixelSet":
        """The pixels where the mask ``keep [M]`` holds."""
        return PixelSet(None if self._z is None else self._z[keep], self.t[keep], self.image[keep], self.num_images,
                        None if self.zc is None else self.zc[:, keep])

    def class_major(self) -> torch.Tensor:
        """``[C, M]`` logits, one class's values contiguous: float32 when that holds them exactly
        (half the bytes per pass; every float64 sum the fit makes of them is the same)."""
        if self.zc is not None:
            return self.zc
        zc = self.z.t().contiguous()
        if zc.dtype == torch.float64 and bool((zc.float().double() == zc).all()):
            zc = zc.float()
        return zc


def _check_logits(logits: torch.Tensor, where: str = "logits") -> None:
    if not torch.is_floating_point(logits):
        raise SegrewardError(f"{where} must be a float tensor, got {logits.dtype}")
    # A finite sum means every value is finite (NaN and inf propagate); only when it is not (a bad
    # value, or a sum that overflowed) does the elementwise check run.
    if not bool(torch.isfinite(logits.sum())) and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise SegrewardError(f"{where} hold {bad} NaN or infinite values; calibrate a model whose outputs are finite")


def checked_batch(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                  where: str = "logits") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, C, H, W], labels [N, H, W] long, valid [N, H, W])`` of ``logits`` and ``labels``
    (or already flat ``[M, C]`` / ``[M]``), with one-line errors for bad input."""
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
    return logits, labels, valid


def flatten_labelled(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     where: str = "logits", class_major: bool = False):
    """``(z [M, C], t [M], image [M])`` of the labelled pixels of ``logits [N, C, H, W]`` and
    ``labels [N, H, W]`` (or already flat ``[M, C]`` / ``[M]``), with one-line errors for bad input.
    ``z`` is float64; with ``class_major``, ``[C, M]`` in the logits' precision (float32 at least)."""
    logits, labels, valid = checked_batch(logits, labels, num_classes, ignore_index, where)
    n, _, h, w = logits.shape
    t = labels[valid]
    image = torch.arange(n, device=labels.device).view(n, 1, 1).expand(n, h, w)[valid]
    if class_major:  # [C, M] in the logits' precision (at least float32): one copy, then one gather per class
        zc = logits.transpose(0, 1).reshape(logits.shape[1], -1).index_select(1, valid.view(-1).nonzero().flatten())
        return (zc if zc.dtype == torch.float64 else zc.float()), t, image
    return logits.permute(0, 2, 3, 1)[valid].to(torch.float64), t, image


def pixel_set(logits, labels, num_classes: int | None = None, ignore_index: int = 255) -> PixelSet:
    """A :class:`PixelSet` from ``logits [N, C, H, W]`` / ``labels [N, H, W]`` tensors, or from
    lists of per-image ``[C, H, W]`` / ``[H, W]`` tensors (sizes may differ between images)."""
    if isinstance(logits, (list, tuple)):
        if len(logits) != len(labels):
            raise SegrewardError(f"got {len(logits)} logit maps but {len(labels)} label maps")
        if not logits:
            raise SegrewardError("no images to calibrate on")
        num_classes = num_classes or logits[0].shape[0]
        parts = [flatten_labelled(z.unsqueeze(0), y.unsqueeze(0), num_classes, ignore_index, f"image {j}", True)
                 for j, (z, y) in enumerate(zip(logits, labels))]
        zc = torch.cat([p[0] for p in parts], dim=1)
        t = torch.cat([p[1] for p in parts])
        image = torch.cat([torch.full_like(p[1], j) for j, p in enumerate(parts)])
        n = len(parts)
    else:
        require_tensors("fit_offsets", logits=logits, labels=labels)
        if labels.numel() == 0:
            raise SegrewardError(f"no images to calibrate on: labels {tuple(labels.shape)} hold no pixel")
        num_classes = num_classes or logits.shape[1 if logits.dim() == 4 else -1]
        zc, t, image = flatten_labelled(logits, labels, num_classes, ignore_index, class_major=True)
        n = logits.shape[0] if logits.dim() == 4 else 1
    if t.numel() == 0:
        raise SegrewardError(f"no labelled pixel to calibrate on: every label is the ignore index {ignore_index}")
    return PixelSet(None, t, image, n, zc)


def argmax_with_offsets(z: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``argmax_k (z_k + b_k)`` over the last dimension of ``z [M, C]`` (first maximum on ties)."""
    return (z + offsets.to(z)).argmax(dim=-1)


def counts_of(pred: torch.Tensor, t: torch.Tensor, c: int) -> torch.Tensor:
    """``[C, 3]`` float64 counts (intersection, predicted area, label area)."""
    hit = (pred == t).to(torch.float64)
    return torch.stack([torch.bincount(t, weights=hit, minlength=c).to(torch.float64),
                        torch.bincount(pred, minlength=c).to(torch.float64),
                        torch.bincount(t, minlength=c).to(torch.float64)], dim=-1)


def argmax_major(zc: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``argmax_k (z_k + b_k)`` (float64 sums, first maximum on ties) of class-major ``zc [C, M]``:
    one pass per class over contiguous rows, the same prediction as :func:`argmax_with_offsets`."""
    b = offsets.to(device=zc.device, dtype=torch.float64)
    best = zc[0].to(torch.float64) + b[0]
    arg = torch.zeros(zc.shape[1], dtype=torch.long, device=zc.device)
    for k in range(1, zc.shape[0]):
        x = zc[k].to(torch.float64) + b[k]
        arg += (x > best) * (k - arg)
        torch.maximum(best, x, out=best)
    return arg


def set_confusion(pixels: PixelSet, offsets: torch.Tensor) -> torch.Tensor:
    """``[C, C]`` confusion (label x prediction) of the set's argmax under ``offsets`` (one fused
    loop on a CPU with numba, :func:`_kernels.confusion`; the same prediction)."""
    zc = pixels.class_major()
    if _numba.usable(zc):
        c, m = zc.shape
        zc = zc.contiguous()
        out = torch.zeros(c, c, dtype=torch.long)
        _kernels.confusion(zc.numpy(), pixels.t.numpy(), offsets.to(torch.float64).contiguous().numpy(),
                           torch.empty(m, dtype=torch.float64).numpy(), torch.empty(m, dtype=torch.int32).numpy(),
                           out.numpy())
        return out
    pred = argmax_major(zc, offsets)
    return confusion_matrix(pred.view(1, -1), pixels.t.view(1, -1), pixels.num_classes, validate=False)[0]


def confusion_reward(form: CountReward, cm: torch.Tensor) -> float:
    """The reward of a ``[C, C]`` confusion matrix."""
    cm = cm.to(torch.float64)
    return float(reward_from_counts(form, cm.diagonal(), cm.sum(0), cm.sum(1)))


def set_reward(form: CountReward, pixels: PixelSet, offsets: torch.Tensor) -> float:
    """The dataset-level reward of the set's argmax prediction under ``offsets``."""
    k = counts_of(argmax_with_offsets(pixels.z, offsets), pixels.t, pixels.num_classes)
    return float(reward_from_counts(form, k[:, 0], k[:, 1], k[:, 2]))


def set_scores(pixels: PixelSet, offsets: torch.Tensor) -> dict:
    """MMSegmentation's dataset-level scores (percent) of the set under ``offsets``."""
    return scores_from_confusion(set_confusion(pixels, offsets))


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
    """Each pixel's best and second-best class under offsets ``b`` (first maximum on ties, like
    ``argmax``) for class-major logits ``zc [C, M]``, kept up to date when one offset changes.

    The step of class ``k`` needs each pixel's best class other than ``k`` (:meth:`without`);
    after it, a pixel's new best is ``k`` or that class. Raising ``b_k`` can only push ``k`` up:
    the new second is the old best or second, or ``k``. Lowering it needs each row's third
    class only where ``k`` was one of the two and falls below the other: only those rows are
    recomputed. Scores ``z_k + b_k`` are float64 sums, as ``argmax(z + b)`` in float64 makes
    them; values move by ``maximum``/``minimum`` (exact) and class ids stay int32.

    Every ``[M]`` result of a step is written into buffers allocated once (``out=`` and in-place
    ops): a fresh multi-megabyte tensor per operation costs page faults that, on a CPU, took
    longer than the arithmetic (see ``docs/calibrate.md``). The arrays :meth:`without` returns
    are those buffers: valid until the next call.
    """

    def __init__(self, zc: torch.Tensor, b: torch.Tensor, fused: bool = False):
        self.zc, self.b = zc, b.to(device=zc.device, dtype=torch.float64)
        m, dev = zc.shape[1], zc.device
        self.fused = fused  # the per-pixel loops by numba (the caller checked _numba.usable; see _kernels)
        if self.fused:
            self.v1, self.v2 = (torch.empty(m, dtype=torch.float64) for _ in range(2))
            self.i1, self.i2 = (torch.empty(m, dtype=torch.int32) for _ in range(2))
            _kernels.top2(zc.numpy(), self.b.numpy(), self.v1.numpy(), self.i1.numpy(), self.v2.numpy(),
                          self.i2.numpy())
        else:
            self.v1, self.i1, self.v2, self.i2 = self._full(zc, self.b)
            # the tensor code's buffers (the fused loops need none)
            self.first, self.src = torch.empty(m, dtype=torch.bool, device=dev), torch.empty_like(self.i1)
            self.best_other, self.x = torch.empty_like(self.v1), torch.empty_like(self.v1)
            self.m1, self.m2, self.m3 = (torch.empty(m, dtype=torch.bool, device=dev) for _ in range(3))

    @staticmethod
    def _full(zc: torch.Tensor, b: torch.Tensor | None):
        """Top two of every column of the scores ``zc [C, R] + b`` (``b`` None: ``zc`` are the
        float64 scores), first maximum on ties as ``argmax``: the maximum by ``amax``, its first
        index as the number of classes whose running maximum is still below it (a reduction
        that tracks indices over the strided class dim is slow), then the same without it."""
        if b is None and zc.dtype == torch.float64:
            s = zc.clone()  # the caller's scores stay as they are
        else:  # one float64 buffer, the offsets added in place (no second [C, R] temporary)
            s = torch.empty(zc.shape, dtype=torch.float64, device=zc.device).copy_(zc)
            if b is not None:
                s.add_(b.unsqueeze(1))

        def first_max(s):
            top = s.amax(0)
            idx = torch.zeros(s.shape[1], dtype=torch.int32, device=s.device)
            run = s[0].clone()
            for k in range(1, s.shape[0]):
                idx += run < top
                torch.maximum(run, s[k], out=run)
            return top, idx

        v1, i1 = first_max(s)
        s.scatter_(0, i1.long().unsqueeze(0), -float("inf"))
        v2, i2 = first_max(s)
        return v1, i1, v2, i2

    def without(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(first, argmax, max)`` of each row over the classes other than ``k``; ``first``: ``k`` is the best."""
        first = torch.eq(self.i1, k, out=self.first)
        src = torch.where(first, self.i2, self.i1, out=self.src)
        return first, src, torch.where(first, self.v2, self.v1, out=self.best_other)

    def score(self, k: int) -> torch.Tensor:
        """``z_k + b_k`` in float64 (into a buffer: valid until the next call)."""
        return self.x.copy_(self.zc[k]).add_(self.b[k])

    def prefix(self, k: int, t32: torch.Tensor, tau: torch.Tensor, code: torch.Tensor) -> tuple[float, float]:
        """Fused: the thresholds ``tau`` and the codes of class ``k``'s step in one loop (what
        :meth:`without` gives, the fused :meth:`set` finds again); ``(min tau, max tau)``."""
        return _kernels.prefix(self.i1.numpy(), self.i2.numpy(), self.v1.numpy(), self.v2.numpy(),
                               self.zc[k].numpy(), t32.numpy(), k, tau.numpy(), code.numpy())

    def set(self, k: int, old: float, value: float, first: torch.Tensor | None = None,
            src: torch.Tensor | None = None, best_other: torch.Tensor | None = None) -> None:
        """``b_k``: ``old -> value`` (host floats: no read from the device); ``(first, src,
        best_other)`` as :meth:`without` gave them before (the fused loops find them again)."""
        rising = value > old
        self.b[k] = value
        if self.fused:
            arrays = [a.numpy() for a in (self.v1, self.i1, self.v2, self.i2)]
            if rising:
                _kernels.rise(self.zc[k].numpy(), value, k, *arrays)
            else:
                _kernels.fall(self.zc.numpy(), self.b.numpy(), value, k, *arrays)
            return
        x = self.score(k)
        # k is the new best: x > best_other, or equal and k the lower class id
        wins = torch.gt(x, best_other, out=self.m1)
        tie = torch.eq(x, best_other, out=self.m2).logical_and_(torch.gt(src, k, out=self.m3))
        wins.logical_or_(tie)
        if rising:  # the new second: the old best if k wins, else k or the old second
            second = torch.gt(x, self.v2, out=self.m2)
            second.logical_or_(torch.eq(x, self.v2, out=self.m3).logical_and_(self.i2 > k))
            self.i2.masked_fill_(second, k)
            torch.where(wins, src, self.i2, out=self.i2)
            self.i1.copy_(src).masked_fill_(wins, k)
            torch.minimum(torch.maximum(x, self.v2, out=self.v2), best_other, out=self.v2)
            torch.maximum(x, best_other, out=self.v1)
            return
        torch.where(first, x, self.v1, out=self.v1)  # rows where k stays the best; the others are recomputed
        redo = torch.eq(self.i2, k, out=self.m2).logical_or_(first).logical_and_(wins.logical_not_())
        rows = torch.nonzero(redo).flatten()
        if rows.numel():
            v1, i1, v2, i2 = self._full(self.zc.index_select(1, rows), self.b)
            for name, new in (("v1", v1), ("i1", i1), ("v2", v2), ("i2", i2)):
                getattr(self, name).index_copy_(0, rows, new)


@torch.no_grad()  # no gradient to track: the step's ~100 small tensor ops each skip autograd's bookkeeping
def fit_pixels(pixels: PixelSet, form: CountReward, max_sweeps: int = 20, bound: float | None = None,
               init=None, tol: float = 1e-12, progress: bool = False,
               start: dict | None = None) -> tuple[torch.Tensor, list, bool]:
    """Coordinate ascent on a :class:`PixelSet`: ``(offsets, reward after each sweep, converged)``.

    One sweep visits the classes in order; each step is exact (:func:`~segreward.calibrate.search.
    bounded_search`, or :func:`line_search_full` for small sets). The reward never decreases; the
    search stops when ``C`` steps in a row change no offset (a step repeated with no offset
    changed since would find the same) or after ``max_sweeps`` sweeps. The logits are held
    class-major (``[C, M]``: one class's column is contiguous), float32 when that is exact. On a
    CPU with numba installed the per-pixel passes of a step run as fused loops
    (:mod:`segreward.calibrate._kernels`: bit-equal offsets, about 1.7x faster). ``start``: a dict
    that receives the ``[C, C]`` confusion of the starting prediction (``"confusion"``).
    """
    check_settings(max_sweeps, bound)
    t, c = pixels.t, pixels.num_classes
    b = check_offsets(init, c)
    label_area = torch.bincount(t, minlength=c).to(torch.float64)
    if c == 1:  # one class: nothing to choose
        return b - b.mean(), [set_reward(form, pixels, b)], True
    zc = pixels.class_major()
    small = t.numel() <= _SMALL
    fused = not small and _numba.usable(zc)
    if fused:
        zc = zc.contiguous()
    top = _Top2(zc, b, fused=fused)
    t32 = t.to(torch.int32)
    # The step's [M] arrays, allocated once (see _Top2): thresholds, codes, and bounded_search's;
    # the tensor code's codes also need 2 at each pixel's label ([C, M] int8) and a mask.
    tau_buf, code_buf = torch.empty(t.numel(), dtype=torch.float64, device=t.device), torch.empty_like(t32)
    if not (fused or small):
        t2 = torch.zeros(c, t.numel(), dtype=torch.int8, device=t.device).scatter_(0, t.view(1, -1), 2)
        same = torch.empty(t.numel(), dtype=torch.bool, device=t.device)
    work = SearchWork(t.numel(), t.device, fused=fused)
    history, converged = [], False
    bar = tqdm(range(max_sweeps), desc="calibrate", disable=not progress, leave=False)
    # the prediction as it is (first maximum on ties, like argmax): its confusion and counts
    if fused:
        cm0 = torch.zeros(c, c, dtype=torch.long)
        _kernels.pair_counts(t.numpy(), top.i1.numpy(), cm0.numpy())
    else:
        cm0 = confusion_matrix(top.i1.long().view(1, -1), t.view(1, -1), c, validate=False)[0]
    cnt = torch.stack([cm0.diagonal(), cm0.sum(0), cm0.sum(1)], dim=-1).to(torch.float64)  # as counts_of
    if start is not None:  # the caller's "before": the confusion of that prediction
        start["confusion"] = cm0
    reward_now, unchanged = float(reward_from_counts(form, cnt[:, 0], cnt[:, 1], cnt[:, 2])), 0
    offsets = b.tolist()
    for _ in bar:
        for k in range(c):
            if unchanged >= c:
                break
            if fused:  # one loop for the thresholds and codes, then the search's own
                first = src = best_other = None
                rng = top.prefix(k, t32, tau_buf, code_buf)
                x, r = bounded_search(form, tau_buf, code_buf, k, label_area, offsets[k], reward_now, bound, tol,
                                      work=work, t_range=rng)
            else:
                first, src, best_other = top.without(k)
                tau = torch.sub(best_other, zc[k], out=tau_buf)
                if small:
                    step = line_search_full(form, tau, src, t, k, label_area, offsets[k], reward_now, bound, tol)
                    x, r = step.offset, step.reward
                else:  # src_state's codes: 3 * src + (label is src) + 2 (label is k)
                    code = torch.mul(src, 3, out=code_buf).add_(torch.eq(t32, src, out=same)).add_(t2[k])
                    x, r = bounded_search(form, tau, code, k, label_area, offsets[k], reward_now, bound, tol,
                                          work=work)
            if x != offsets[k]:
                top.set(k, offsets[k], x, first, src, best_other)
                offsets[k], reward_now, unchanged = x, r, 0
            else:
                unchanged += 1
        history.append(reward_now)
        bar.set_postfix(reward=f"{reward_now:.4f}", refresh=False)
        if unchanged >= c:
            converged = True
            break
    bar.close()
    b = torch.tensor(offsets, dtype=torch.float64)
    return b - b.mean(), history, converged
