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

from segreward.calibrate.exact import Calibration, check_settings, check_offsets, flatten_labelled
from segreward.calibrate.search import check_count_form
from segreward.credit import CountReward, reward_from_counts
from segreward.errors import SegrewardError
from segreward.metrics import all_reduce_cpu, scores_from_confusion

__all__ = ["fit_offsets_streaming", "ThresholdHistogram"]

_CHUNK = 1 << 18  # pixels binned at once: bounds the [pixels, C] temporaries


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
        z, t, _ = flatten_labelled(logits, labels, self.c, self.ignore_index, where="calibration batch")
        dev = z.device
        b = self.b.to(dev)
        lo = (b - self.span).unsqueeze(0)
        classes = torch.arange(self.c, device=dev)
        hist, confusion = self.hist.to(dev), self.confusion.to(dev)
        for start in range(0, t.numel(), _CHUNK):
            s = z[start:start + _CHUNK] + b
            tt = t[start:start + _CHUNK]
            top2 = s.topk(min(2, self.c), dim=1)
            v1, i1 = top2.values[:, :1], top2.indices[:, :1]
            pred = s.argmax(dim=1)  # first maximum, as the model's argmax
            confusion += torch.bincount(tt * self.c + pred, minlength=self.c * self.c)
            if self.c == 1:
                continue
            v2, i2 = top2.values[:, 1:], top2.indices[:, 1:]
            first = i1 == classes  # [P, C]: class c is the pixel's top class
            best_other = torch.where(first, v2, v1)
            src = torch.where(first, i2, i1)
            tau = best_other - s + b  # threshold of b_c: z_c + b_c > best other <=> b_c > tau
            idx = torch.floor((tau - lo) / self.width).add_(1).clamp_(0, self.bins + 1).long()
            state = (tt.unsqueeze(1) == src).long() + 2 * (tt.unsqueeze(1) == classes).long()
            flat = ((classes * (self.bins + 2) + idx) * self.c + src) * 3 + state
            hist += torch.bincount(flat.flatten(), minlength=hist.numel())
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

    def run_pass(offsets: torch.Tensor) -> tuple[ThresholdHistogram, float]:
        h = ThresholdHistogram(offsets, bins, span, ignore_index)
        batches = passes()
        try:
            batches = iter(batches)
        except TypeError:
            raise SegrewardError(f"fit_offsets_streaming: passes() returned a {type(batches).__name__}, not an iterable "
                                 "of (logits, labels) batches") from None
        n = 0
        for n, batch in enumerate(batches, 1):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
                raise SegrewardError(f"fit_offsets_streaming: batch {n} of pass {len(history) + 1} is {what}; every "
                                     "batch must be a (logits [B, C, H, W], labels [B, H, W]) pair")
            h.update(*batch)
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
                       scores_after=scores_from_confusion(hist.confusion.view(c, c)), mode="streaming")
