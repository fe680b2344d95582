"""Streaming calibration: one pass over the data per sweep, never more than one batch of logits held.

A pass at offsets ``b`` bins every labelled pixel's threshold ``tau_i(c)`` (see
:mod:`segreward.calibrate.search`) for *every* class ``c`` on a fixed grid of ``bins`` bins of
width ``2 * span / bins`` logits centred on ``b_c``, counting per bin the pixel's best other
class ``a`` and whether its label is ``a``, ``c`` or neither. That histogram ``[C, bins + 2, C, 3]``
(plus an under- and an overflow bin) gives the counts, hence the reward, at every bin edge
exactly, so each class's 1-D step is exact up to the bin width. Its size depends on the number of
classes and bins only, never on the number of images; under DDP it is all-reduced.

All classes' steps come from the same pass (a Jacobi sweep, not the in-memory mode's
Gauss-Seidel one). The next pass measures the reward of the combined step; if it fell, the
combined step is undone and only the single best class's step is taken, whose reward the
histogram already gave exactly. So the reward never decreases from one evaluated state to the
next, and the result is always a state a pass has scored.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from segreward import _numba
from segreward.calibrate import _kernels
from segreward.calibrate.exact import Calibration, _Top2, check_settings, check_offsets, checked_batch
from segreward.calibrate.search import check_count_form, count
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError
from segreward.metrics import all_reduce_cpu, scores_from_confusion

__all__ = ["fit_offsets_streaming", "ThresholdHistogram"]

_CHUNK = 1 << 18  # pixels binned at once: bounds the [pixels, C] temporaries


def _pass_counts(zc: torch.Tensor, t: torch.Tensor, b: torch.Tensor, bins: int, span: float):
    """``(hist, confusion)`` of pixels with class-major logits ``zc [C, P]`` and labels ``t [P]``
    (int32; ``C`` for an ignored pixel: counted nowhere) at offsets ``b`` (float64): see
    :class:`ThresholdHistogram`.

    Every (class, pixel) pair at once over contiguous ``[C, P]`` planes, without gathers or
    ``torch.where`` (slow on a CPU): with ``v1, v2`` a pixel's two best scores, its threshold for
    class ``k`` is ``(v1 - s_k) + [k is best] (v2 - v1) + b_k``, which is exactly ``(best other
    - s_k) + b_k`` (``s_k = v1`` where ``k`` is best, and adding 0 is exact). Scores are float64
    sums ``z + b`` as in the in-memory mode; class ids and keys int32.
    """
    c, dev = zc.shape[0], zc.device
    nb = bins + 2
    scores = zc.to(torch.float64).add_(b.unsqueeze(1))  # [C, P]
    v1, i1, v2, i2 = _Top2._full(scores, None)  # first maximum on ties, like argmax
    confusion = count(t * c + i1, (c + 1) * c)[:c * c]  # ignored pixels: row c, dropped
    size = c * nb * c * 3
    if c == 1:
        return torch.zeros(size, dtype=torch.long, device=dev), confusion
    k = torch.arange(c, dtype=torch.int32, device=dev).unsqueeze(1)
    first = i1 == k  # [C, P]
    tau = torch.sub(v1, scores, out=scores).addcmul_(first, (v2 - v1)).add_(b.unsqueeze(1))
    idx = tau.sub_((b - span).unsqueeze(1)).div_(2.0 * span / bins).floor_().add_(1).clamp_(0, bins + 1)
    # Key ((k nb + bin) C + src) 3 + state, state = [label == src] + 2 [label == k]: per pixel the
    # codes of its two candidate sources, per pair the one that applies.
    code1, code2 = i1 * 3 + (t == i1), i2 * 3 + (t == i2)
    key = torch.zeros(c + 1, t.numel(), dtype=torch.int32, device=dev).scatter_(0, t.long().unsqueeze(0), 2)[:c]
    key += first * (code2 - code1)
    key += code1
    key += (idx.to(torch.int32) + k * nb) * (3 * c)
    ignored = t == c
    key.mul_(~ignored).add_(size * ignored)  # ignored pixels' pairs: one extra bin, dropped
    return count(key.view(-1), size + 1)[:size], confusion


class ThresholdHistogram:
    """Per-class threshold histograms of one pass at offsets ``b``, plus its confusion matrix."""

    def __init__(self, offsets: torch.Tensor, bins: int, span: float, ignore_index: int = 255):
        self.b = offsets.to(torch.float64)
        self.c = offsets.numel()
        self.bins, self.span, self.width = bins, float(span), 2.0 * span / bins
        self.ignore_index = ignore_index
        self.hist = torch.zeros(self.c * (bins + 2) * self.c * 3, dtype=torch.long)
        self.confusion = torch.zeros(self.c * self.c, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels, valid = checked_batch(logits, labels, self.c, self.ignore_index, where="calibration batch")
        n, c = logits.shape[:2]
        dev = logits.device
        hist, confusion = self.hist.to(dev), self.confusion.to(dev)
        b = self.b.to(dev)
        # Class-major [C, pixels] planes: one image's logits[i] already is one (no copy); small
        # images are grouped (one copy) so that the per-call histogram work is not repeated per
        # image. Ignored pixels get label c and are counted apart (no compaction pass).
        t_all = labels.masked_fill(~valid, c).to(torch.int32).view(-1)
        hw = t_all.numel() // max(n, 1)
        group = max(1, _CHUNK // max(hw, 1))
        for i in range(0, n, group):
            z = logits[i:i + group].transpose(0, 1).reshape(c, -1)
            t = t_all[i * hw:(i + group) * hw]
            if _numba.usable(z) and c > 1:
                # one loop over the pixels (numba): the same sums, thresholds and bins
                _kernels.stream_pass(z.numpy(), t.numpy(), b.numpy(), self.bins, self.span, self.width,
                                     hist.numpy(), confusion.numpy())
                continue
            for start in range(0, z.shape[1], _CHUNK):
                h, cm = _pass_counts(z[:, start:start + _CHUNK], t[start:start + _CHUNK], b, self.bins, self.span)
                hist += h
                confusion += cm
        self.hist, self.confusion = hist.cpu(), confusion.cpu()

    def all_reduce(self) -> None:
        both = all_reduce_cpu(torch.cat([self.hist, self.confusion]))  # one collective for both
        self.hist, self.confusion = both[:self.hist.numel()], both[self.hist.numel():]

    def counts(self) -> torch.Tensor:
        """``[C, 3]`` counts (I, P, L) of the argmax under the pass's offsets."""
        cm = self.confusion.view(self.c, self.c).to(torch.float64)
        return torch.stack([cm.diagonal(), cm.sum(0), cm.sum(1)], dim=-1)

    def edge_rewards(self, form: CountReward, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, reward)``: the ``bins + 1`` bin edges of class ``k`` and the exact reward with
        ``b_k`` at each (the other offsets as in the pass)."""
        c = self.c
        h = self.hist.view(c, self.bins + 2, c, 3)[k].to(torch.float64)  # [bins + 2, C(src), 3]
        label = self.counts()[:, 2]
        moved = torch.cumsum(h.sum(-1), 0)[: self.bins + 1]  # [E, C]: pixels moved out of each src
        hits_lost = torch.cumsum(h[..., 1], 0)[: self.bins + 1]
        hits_in = torch.cumsum(h[..., 2].sum(-1), 0)[: self.bins + 1]
        p0, i0 = h.sum((0, 2)), h[..., 1].sum(0)  # b_k = -inf: every pixel at its best other class
        p = p0 - moved
        i = i0 - hits_lost
        p[:, k], i[:, k] = moved.sum(-1), hits_in
        reward = reward_from_counts(form, i, p, label.expand_as(p))
        x = self.b[k] - self.span + self.width * torch.arange(self.bins + 1, dtype=torch.float64)
        return x, reward

    def best_step(self, form: CountReward, k: int, current_reward: float, bound: float | None,
                  tol: float) -> tuple[float, float]:
        """The best edge for ``b_k`` (middle of the best run of edges) and its reward; ``b_k``
        itself when no edge beats ``current_reward`` by more than ``tol``."""
        x, reward = self.edge_rewards(form, k)
        if bound is not None:
            reward = torch.where(x.abs() <= bound, reward, torch.full_like(reward, -float("inf")))
        best = float(reward.max())
        if best <= current_reward + tol:
            return float(self.b[k]), current_reward
        good = (reward >= best - tol).tolist()
        runs, j = [], 0
        while j < len(good):  # runs of consecutive best edges; the middle of the nearest one
            if good[j]:
                e = j
                while e + 1 < len(good) and good[e + 1]:
                    e += 1
                mid = (j + e) // 2
                runs.append((abs(float(x[mid] - self.b[k])), mid))
                j = e + 1
            else:
                j += 1
        _, mid = min(runs)
        return float(x[mid]), float(reward[mid])


def fit_offsets_streaming(passes: Callable[[], Iterable], num_classes: int, reward="miou",
                          ignore_index: int = 255, class_weights=None, max_sweeps: int = 20,
                          bound: float | None = None, init=None, bins: int = 1024, span: float = 8.0,
                          tol: float = 1e-12, progress: bool = False) -> Calibration:
    """Offsets maximising a dataset-level count reward, one pass over the data per sweep.

    ``passes()`` returns a fresh iterable of ``(logits [B, C, H, W], labels [B, H, W])`` batches
    (logits at the label size) each time it is called: one call is one pass (under DDP, each
    rank's shard). ``bins``/``span``: the threshold grid, ``2 * span / bins`` logits wide around
    each current offset (a step moves an offset by at most ``span``). Memory:
    ``C^2 (bins + 2) 3`` counts (19 classes, 1024 bins: 8.9 MB), whatever the number of images.
    """
    if not callable(passes):
        kind = type(passes).__name__
        raise SegrewardError(f"fit_offsets_streaming(passes=...): got a {kind}; give a function that returns a fresh "
                             "iterable of (logits, labels) batches on every call (one call per pass), e.g. "
                             "passes=lambda: batches for a list, or lambda: iter(loader)")
    check_settings(max_sweeps, bound)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins % 2:
        raise SegrewardError(f"bins must be an even integer >= 2, got {bins!r}")
    if not float(span) > 0:
        raise SegrewardError(f"span must be > 0 logits, got {span!r}")
    form = check_count_form(reward, num_classes, class_weights)
    b = check_offsets(init, num_classes)

    images = [0]  # in this process's passes

    def run_pass(offsets: torch.Tensor) -> tuple[ThresholdHistogram, float]:
        h = ThresholdHistogram(offsets, bins, span, ignore_index)
        batches = passes()
        try:
            batches = iter(batches)
        except TypeError:
            raise SegrewardError(f"fit_offsets_streaming: passes() returned a {type(batches).__name__}, not an iterable "
                                 "of (logits, labels) batches") from None
        n = 0
        images[0] = 0
        for n, batch in enumerate(batches, 1):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
                raise SegrewardError(f"fit_offsets_streaming: batch {n} of pass {len(history) + 1} is {what}; every "
                                     "batch must be a (logits [B, C, H, W], labels [B, H, W]) pair")
            h.update(*batch)
            images[0] += batch[1].shape[0]
        if n == 0 and not torch.distributed.is_initialized():  # under DDP a rank's shard may be empty
            again = " (it must return a fresh iterable each call: an iterator or generator runs only once)" \
                if history else ""
            raise SegrewardError(f"fit_offsets_streaming: no batches: passes() gave none on pass {len(history) + 1}"
                                 f"{again}")
        h.all_reduce()
        cnt = h.counts()
        if float(cnt[:, 2].sum()) == 0:
            raise SegrewardError(f"no labelled pixel to calibrate on: every label is the ignore index {ignore_index}")
        return h, float(reward_from_counts(form, cnt[:, 0], cnt[:, 1], cnt[:, 2]))

    bar = tqdm(total=max_sweeps, desc="calibrate (streaming)", disable=not progress, leave=False)

    def scored(offsets):
        hist, r = run_pass(offsets)
        history.append(r)
        bar.update(1)
        bar.set_postfix(reward=f"{r:.4f}", refresh=False)
        return r, offsets, hist

    history: list = []
    state = first = scored(b)  # (reward, offsets, histogram) of the best scored state
    converged = False
    while len(history) < max_sweeps:
        r, b, hist = state
        steps = [hist.best_step(form, k, r, bound, tol) for k in range(num_classes)]
        changed = [k for k, (x, _) in enumerate(steps) if x != float(b[k])]
        if not changed:
            converged = True
            break
        combined = b.clone()
        for k in changed:
            combined[k] = steps[k][0]
        trial = scored(combined)
        if trial[0] >= r:
            state = trial
            continue
        # The classes' steps interfered and the reward fell: take the best single step instead,
        # whose reward the histogram gave exactly.
        if len(history) >= max_sweeps:
            break
        k = max(changed, key=lambda j: steps[j][1])
        single = b.clone()
        single[k] = steps[k][0]
        state = scored(single)
    bar.close()
    r, b, hist = state
    c = num_classes
    return Calibration(offsets=b - b.mean(), reward=form.name, reward_before=history[0], reward_after=r,
                       sweeps=len(history), converged=converged, history=history,
                       scores_before=scores_from_confusion(first[2].confusion.view(c, c)),
                       scores_after=scores_from_confusion(hist.confusion.view(c, c)), mode="streaming",
                       num_images=images[0])
