"""Exact coordinate ascent of a dataset-level count reward over per-class logit offsets.

The calibrated prediction of pixel ``i`` is ``argmax_k (z_ik + b_k)``. With every offset but
``b_c`` fixed, pixel ``i`` predicts ``c`` exactly when ``b_c > tau_i`` with

    tau_i = max_{k != c} (z_ik + b_k) - z_ic,

and otherwise predicts its best other class ``a_i``. So the reward, as a function of ``b_c``, is
piecewise constant with breakpoints at the thresholds ``tau_i``: starting from ``b_c = -inf``
(no pixel predicts ``c``), sorting the thresholds and moving the pixels one by one from ``a_i``
into ``c`` visits every value the reward can take. Each move changes two classes' counts only
(the same two-class update as :mod:`segreward.credit`):

    class a_i:  P -= 1,  I -= [a_i == t_i]        class c:  P += 1,  I += [t_i == c]

and the counts after every prefix of moves come from cumulative sums (per source class for
``a_i``), so the reward at all ``M + 1`` intervals costs one sort and a few ``[M]`` passes. The
step takes the middle of the best interval (keeping ``b_c`` where it is when its interval is
already among the best, so a sweep that changes nothing ends the search).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from segreward.calibrate import _kernels, _search_kernel
from segreward.credit import CountReward, _miou_terms, reward_from_counts
from segreward.errors import SegrewardError

__all__ = ["LineSearch", "line_search", "line_search_full", "reward_curve", "class_terms", "EDGE_MARGIN", "TIE_EPS"]

# Distance (logits) of the chosen offset from the outermost threshold when the best interval is
# unbounded: far enough to be robust, near enough to stay a small change of the model.
EDGE_MARGIN = 1.0
# An offset is only placed in a gap between consecutive sorted thresholds wider than
# TIE_EPS * max(1, |threshold|) (about 16 float32 ulps), at its middle: a narrower gap would split
# pixels whose logits differ only by float32 rounding, a split the folded float32 model cannot
# reproduce. Gaps are judged one by one (not chained), so dense runs of thresholds still offer
# every wide enough gap; 1e-5 was too coarse (most gaps of a 500k-pixel set are narrower).
TIE_EPS = 2e-6


def tie_eps(tau: torch.Tensor) -> float:
    """The merge distance of breakpoints for thresholds ``tau``."""
    return TIE_EPS * max(1.0, float(tau.abs().max())) if tau.numel() else TIE_EPS


def count(key: torch.Tensor, size: int) -> torch.Tensor:
    """``bincount(key, minlength=size)`` for keys known to be ``< size``; on a GPU by a scatter
    into ``size`` zeros (CUDA's bincount reads the largest key back to the host first)."""
    if key.device.type == "cpu":
        return torch.bincount(key, minlength=size)
    return torch.zeros(size, dtype=torch.long, device=key.device).index_add_(0, key, torch.ones_like(key, dtype=torch.long))


def _eps_of_range(t_lo: float, t_hi: float) -> float:
    """:func:`tie_eps` from the thresholds' smallest and largest value."""
    return TIE_EPS * max(1.0, abs(t_lo), abs(t_hi))


def src_state(src: torch.Tensor, target: torch.Tensor, c: int) -> torch.Tensor:
    """``[M]`` codes ``3 * a_i + s_i`` of each pixel's best other class ``a_i`` and whether its
    label is ``a_i`` (``s_i = 1``), ``c`` (``s_i = 2``) or neither (0): all a move needs."""
    code = src * 3
    code += target == src
    code += 2 * (target == c)
    return code


def class_terms(terms, i: torch.Tensor, p: torch.Tensor, l: torch.Tensor, weight: torch.Tensor | None = None):
    """Per-class terms ``(a, b)`` of counts that each belong to one class (all ``[M]``).

    The built-in terms act elementwise over classes except for an optional class weight
    (``weighted_miou``); ``weight`` is then that weight per element (see :func:`term_weight`).
    """
    if weight is not None:
        terms = terms.func
    a, b = terms(i, p, l)
    if weight is not None:
        a, b = a * weight, b * weight
    return a, b


def term_weight(terms) -> torch.Tensor | None:
    """The class weight ``[C]`` (float64) of a terms function, or None."""
    if isinstance(terms, functools.partial) and "weight" in terms.keywords:
        if terms.args or set(terms.keywords) != {"weight"}:
            raise SegrewardError("calibration supports reward terms with a class weight only as their one keyword")
        return terms.keywords["weight"].to(torch.float64)
    return None


@dataclass(frozen=True)
class LineSearch:
    """Result of one exact 1-D step: the new offset, its reward and the reward it started from."""

    offset: float
    reward: float
    start_reward: float


def _best_interval(reward: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, current: float,
                   current_reward: float, bound: float | None, tol: float, eps: float = 0.0) -> tuple[float, float]:
    """The offset in the middle of the best interval and its reward, or ``current`` when no
    interval beats ``current_reward`` (the reward of the offsets as they are) by more than ``tol``.

    ``reward[j]``: reward on the open interval ``(lo[j], hi[j])`` (bounds may be infinite);
    intervals not wider than ``eps`` are not used (see :data:`TIE_EPS`). Among equally good
    intervals (within ``tol`` of the best), the one whose offset is nearest ``current`` (the
    first in ``reward``'s order on a tie). Tensor work, then one read of three numbers.
    """
    if bound is not None:  # intervals that meet [-bound, bound], clipped to it
        lo, hi = lo.clamp(min=-bound), hi.clamp(max=bound)
    inf = float("inf")
    reward = torch.where(hi - lo > eps, reward, torch.full_like(reward, -inf))
    best = reward.max()
    lo_inf, hi_inf = lo == -inf, hi == inf
    x = torch.where(lo_inf, hi - EDGE_MARGIN, torch.where(hi_inf, lo + EDGE_MARGIN, 0.5 * (lo + hi)))
    x = torch.where(lo_inf & hi_inf, torch.full_like(x, current), x)
    dist = torch.where(reward >= best - tol, (x - current).abs(), torch.full_like(x, inf))
    j = dist.argmin()  # first minimum: the earliest interval on ties
    best_f, x_f, r_f = torch.stack([best, x[j], reward[j]]).tolist()
    if best_f <= current_reward + tol:
        return current, current_reward
    return x_f, r_f


def _move_counts(tau_s: torch.Tensor, code_s: torch.Tensor, seg: torch.Tensor, c: int, num_classes: int,
                 i_base: torch.Tensor, p_base: torch.Tensor, seg_sizes: torch.Tensor, seg_starts: torch.Tensor):
    """Each move's counts, in move order (see :func:`_after_moves`): its source class ``src``, the
    source's intersection and predicted area after the move (``i_src``, ``p_src``; before it:
    ``+ hit`` and ``+ 1``), ``hit`` (it lost a hit), and class ``c``'s counts after it (``i_c``,
    ``p_c``), all float64 but ``src``.

    The ``r``-th move out of class ``k`` within a segment takes it from ``(I_k - h + hit, P_k - r +
    1)`` to ``(I_k - h, P_k - r)``, ``h`` the hits among those ``r`` moves: ranks per (segment,
    source class) from one stable sort, running sums per segment (:func:`_kernels.moves` makes the
    same integer counts in one loop)."""
    n, dev, nseg = tau_s.numel(), tau_s.device, i_base.shape[0]
    src_s, state_s = code_s.div(3, rounding_mode="floor"), code_s.remainder(3)
    hit_src = (state_s == 1).to(torch.float64)
    hit_c = (state_s == 2).to(torch.float64)
    # Moves grouped by (segment, source class), in threshold order within a group.
    key, by_key = torch.sort(seg * num_classes + src_s, stable=True)
    sizes = count(key, nseg * num_classes)
    starts = torch.cumsum(sizes, 0) - sizes
    rep = functools.partial(torch.repeat_interleave, output_size=n)  # n given: no device sync
    rank = torch.arange(1, n + 1, device=dev, dtype=torch.float64) - rep(starts, sizes)
    hits = torch.cumsum(hit_src[by_key], 0)
    left_hits = hits - rep(torch.cat([hits.new_zeros(1), hits])[starts], sizes)
    i_src = torch.empty(n, dtype=torch.float64, device=dev).index_copy_(0, by_key, rep(i_base.flatten(), sizes) - left_hits)
    p_src = torch.empty(n, dtype=torch.float64, device=dev).index_copy_(0, by_key, rep(p_base.flatten(), sizes) - rank)
    moves = torch.arange(1, n + 1, device=dev, dtype=torch.float64) - rep(seg_starts, seg_sizes)
    return (src_s, i_src, p_src, hit_src, i_base[seg, c] + _running(hit_c, seg_sizes, seg_starts),
            p_base[seg, c] + moves)


def _running(x: torch.Tensor, seg_sizes: torch.Tensor, seg_starts: torch.Tensor) -> torch.Tensor:
    """Inclusive running sum of ``x`` within each segment (one cumsum, less its value before the segment)."""
    cs = torch.cumsum(x, 0)
    return cs - torch.repeat_interleave(torch.cat([cs.new_zeros(1), cs])[seg_starts], seg_sizes,
                                        output_size=x.numel())


def _after_moves(form: CountReward, tau_s: torch.Tensor, code_s: torch.Tensor, seg: torch.Tensor, c: int,
                 lab: torch.Tensor, i_base: torch.Tensor, p_base: torch.Tensor,
                 seg_starts: torch.Tensor | None = None, moved=None) -> torch.Tensor:
    """The reward after each move ``[n]``, for pixels in segments that each start from their own
    counts: pixels sorted by ``(seg, tau)``; segment ``g`` starts from ``(i_base[g], p_base[g])``
    (``[S, C]`` float64) and its pixels move into ``c`` in threshold order. Each move changes the
    terms of two classes, its source and ``c``: running sums of those changes per segment.

    ``seg_starts [S + 1]`` (where each segment begins, and the end) and ``moved`` (the counts of
    :func:`_move_counts`) when the caller already has them (the fused loops)."""
    n, num_classes, dev = tau_s.numel(), lab.numel(), tau_s.device
    nseg = i_base.shape[0]
    if seg_starts is None:
        seg_sizes = count(seg, nseg)
        starts = torch.cumsum(seg_sizes, 0) - seg_sizes
    else:
        seg_sizes, starts = seg_starts[1:] - seg_starts[:-1], seg_starts[:-1]
    fused = moved is not None  # the fused loops' counts (CPU, numba)
    if moved is None:
        moved = _move_counts(tau_s, code_s, seg, c, num_classes, i_base, p_base, seg_sizes, starts)
    src, i_src, p_src, hit, ic, pc = moved
    if fused and seg_starts is not None and form.parts == ((_miou_terms, 1.0),):
        # the plain mIoU by one loop (the fused counts' path): the same operations, the same bits
        a0, b0 = _miou_terms(i_base, p_base, lab.expand_as(p_base))
        out = torch.empty(n, dtype=torch.float64)
        _kernels.miou_after_moves(src.numpy(), i_src.numpy(), p_src.numpy(), hit.numpy(), ic.numpy(), pc.numpy(),
                                  lab.numpy(), c, seg_starts.numpy(), (a0.sum(-1) - a0[:, c]).numpy(),
                                  (b0.sum(-1) - b0[:, c]).numpy(), out.numpy())
        return out
    l_src = lab[src]
    total, weight = None, 0.0
    for terms, w in form.parts:
        cw = term_weight(terms)
        cw = None if cw is None else cw.to(dev)
        w_src = None if cw is None else cw[src]
        w_c = None if cw is None else cw[c]
        a_new, b_new = class_terms(terms, i_src, p_src, l_src, w_src)
        a_old, b_old = class_terms(terms, i_src + hit, p_src + 1, l_src, w_src)
        a0, b0 = terms(i_base, p_base, lab.expand_as(p_base))  # [S, C]
        a_c, b_c = class_terms(terms, ic, pc, lab[c].expand(n), w_c)
        num = (a0.sum(-1) - a0[:, c])[seg] + _running(a_new - a_old, seg_sizes, starts) + a_c
        den = (b0.sum(-1) - b0[:, c])[seg] + _running(b_new - b_old, seg_sizes, starts) + b_c
        part = torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))
        total = w * part if total is None else total.add_(part, alpha=w)
        weight += w
    return total / weight


def reward_curve(form: CountReward, tau: torch.Tensor, src: torch.Tensor, target: torch.Tensor, c: int,
                 label_area: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, reward)``: every state the offset ``b_c`` can reach, as the open interval
    ``(lo[j], hi[j])`` of offsets that give it and its reward. Sorted thresholds closer than
    ``eps`` form one breakpoint (their pixels move together).

    ``tau``: ``[M]`` float64 thresholds (pixel predicts ``c`` iff ``b_c > tau``); ``src``: ``[M]``
    long, its best other class ``a_i``; ``target``: ``[M]`` long labels (valid pixels only);
    ``label_area``: ``[C]`` float64 label counts of the whole set. Starting from ``b_c = -inf``
    (every pixel at its best other class), the pixels move into ``c`` one by one.
    """
    m, num_classes, dev = tau.numel(), label_area.numel(), tau.device
    lab = label_area.to(torch.float64)
    p0 = torch.bincount(src, minlength=num_classes).to(torch.float64)
    i0 = torch.bincount(src[target == src], minlength=num_classes).to(torch.float64)
    p0[c], i0[c] = 0.0, 0.0
    tau_s, order = torch.sort(tau, stable=True)
    after = _after_moves(form, tau_s, src_state(src, target, c)[order], torch.zeros(m, dtype=torch.long, device=dev),
                         c, lab, i0.unsqueeze(0), p0.unsqueeze(0))
    reward = torch.cat([reward_from_counts(form, i0, p0, lab).view(1), after])  # [M + 1]: after 0..M moves
    # Tied thresholds move together: only the last move of a tie group is a reachable state, for
    # offsets between that group's last threshold and the next group's first.
    last_of_group = torch.ones(m + 1, dtype=torch.bool, device=dev)
    if m > 1:
        last_of_group[1:m] = (tau_s[1:] - tau_s[:-1]) > eps
    inf = float("inf")
    lo = torch.cat([tau_s.new_tensor([-inf]), tau_s])[last_of_group]
    hi = torch.cat([tau_s, tau_s.new_tensor([inf])])[last_of_group]
    return lo, hi, reward[last_of_group]


def line_search(form: CountReward, tau: torch.Tensor, src: torch.Tensor, target: torch.Tensor, c: int,
                label_area: torch.Tensor, current: float, current_reward: float, bound: float | None = None,
                tol: float = 1e-12) -> LineSearch:
    """The exact best offset of class ``c`` (see :func:`reward_curve` for the arguments).

    ``current`` is ``b_c`` now and ``current_reward`` the reward of the offsets as they are: the
    offset stays unless an interval beats it by more than ``tol``, so a step never lowers the reward.
    """
    if tau.numel() <= _SMALL:
        return line_search_full(form, tau, src, target, c, label_area, current, current_reward, bound, tol)
    x, r = bounded_search(form, tau, src_state(src, target, c), c, label_area, current, current_reward, bound, tol)
    return LineSearch(offset=x, reward=r, start_reward=current_reward)


def line_search_full(form: CountReward, tau: torch.Tensor, src: torch.Tensor, target: torch.Tensor, c: int,
                     label_area: torch.Tensor, current: float, current_reward: float, bound: float | None = None,
                     tol: float = 1e-12) -> LineSearch:
    """:func:`line_search` by the reward at every one of the ``M + 1`` intervals (one full sort)."""
    eps = tie_eps(tau)
    lo, hi, reward = reward_curve(form, tau, src, target, c, label_area, eps=eps)
    x, r = _best_interval(reward, lo, hi, current, current_reward, bound, tol, eps)
    return LineSearch(offset=x, reward=r, start_reward=current_reward)


_SMALL = 8192  # below this many pixels one full sort is cheapest
_GROUP = 16  # bins per group of bounded_search's first level


def _upper_bound(form: CountReward, i_hi: torch.Tensor, p_lo: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """An upper bound of the reward over every state whose counts satisfy ``I <= i_hi`` and
    ``P >= p_lo`` (per class; rows of ``[K, C]``). Every built-in term ``a`` grows with ``I`` and
    falls with ``P``, and ``b`` is smallest there too (a class is least often present), so
    ``sum a(i_hi, p_lo) / sum b(i_hi, p_lo)`` bounds ``Num / Den``; infinite where that ``Den`` is 0."""
    total, weight = 0.0, 0.0
    for terms, w in form.parts:
        a, b = terms(i_hi, p_lo.clamp_min(0), lab)
        num, den = a.sum(-1), b.sum(-1)
        total = total + w * torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)),
                                        torch.full_like(den, float("inf")))
        weight += w
    return total / weight


class SearchWork:
    """The ``[M]`` arrays of :func:`bounded_search`, allocated once for every step of a fit over
    ``m`` pixels (a fresh multi-megabyte tensor per step costs page faults, see ``_Top2``)."""

    def __init__(self, m: int, device=None, fused: bool = False):
        # fused: the binning, edge counts, selection and moves by numba loops (CPU; see _kernels),
        # which need no scaled thresholds or per-pixel flags; bins fit int16
        self.fused = fused
        if self.fused:
            self.idx = torch.empty(m, dtype=torch.int16)
            self.t_s = torch.empty(m, dtype=torch.float64)
            self.code_s = torch.empty(m, dtype=torch.int32)
            self.after = None  # miou_search's move rewards, allocated on first use (see scratch)
        else:
            self.idx = torch.empty(m, dtype=torch.long, device=device)
            self.key = torch.empty(m, dtype=torch.long, device=device)
            self.scaled = torch.empty(m, dtype=torch.float64, device=device)
            self.flag = torch.empty(m, dtype=torch.uint8, device=device)
        self._per_bins: dict = {}

    def scratch(self, m: int):
        """``(t_s, code_s, after)``: :func:`_search_kernel.miou_search`'s ``[M]`` arrays (fused)."""
        if self.after is None:
            self.after = torch.empty(self.t_s.numel(), dtype=torch.float64)
        return self.t_s[:m].numpy(), self.code_s[:m].numpy(), self.after[:m].numpy()

    def take(self, m: int):
        """``(scaled, idx, key, flag)`` for ``m`` pixels (the tensor code's)."""
        return self.scaled[:m], self.idx[:m], self.key[:m], self.flag[:m]

    def fused_bins(self, tau, code, t_lo: float, width: float, nb: int, num_classes: int, c: int):
        """:func:`_kernels.bins` and :func:`_kernels.edges` into buffers: ``(idx [M], t_max [nb],
        t_min [nb], p_e [nb + 1, C], i_e [nb + 1, C], size [nb])``."""
        key = (nb, num_classes)
        if key not in self._per_bins:
            self._per_bins[key] = (torch.empty(nb * num_classes * 3, dtype=torch.int32),
                                   torch.empty(nb, dtype=tau.dtype), torch.empty(nb, dtype=tau.dtype),
                                   torch.empty(nb + 1, num_classes, dtype=torch.float64),
                                   torch.empty(nb + 1, num_classes, dtype=torch.float64),
                                   torch.empty(nb, dtype=torch.long))
        hist, t_max, t_min, p_e, i_e, size = self._per_bins[key]
        idx = self.idx[:tau.numel()]
        _kernels.bins(tau.numpy(), code.numpy(), t_lo, width, nb, num_classes, idx.numpy(), hist.numpy(),
                      t_max.numpy(), t_min.numpy())
        _kernels.edges(hist.numpy(), num_classes, c, p_e.numpy(), i_e.numpy(), size.numpy())
        return idx, t_max, t_min, p_e, i_e, size

    def fused_gather(self, idx, tau, code, bins: torch.Tensor, size: torch.Tensor, nb: int):
        """The pixels of ``bins`` (ascending) in threshold order by :func:`_kernels.gather`: their
        thresholds, codes, segment (position of their bin in ``bins``) and ``starts [S + 1]``."""
        sizes = size[bins]
        starts = torch.zeros(bins.numel() + 1, dtype=torch.long)
        torch.cumsum(sizes, 0, out=starts[1:])
        n = int(starts[-1])
        seg_of_bin = torch.full((nb,), -1, dtype=torch.long).index_copy_(0, bins, torch.arange(bins.numel()))
        t_s, code_s = self.t_s[:n], self.code_s[:n]
        _kernels.gather(idx.numpy(), tau.numpy(), code.numpy(), seg_of_bin.numpy(), starts.numpy(), t_s.numpy(),
                        code_s.numpy())
        return t_s, code_s, torch.repeat_interleave(sizes, output_size=n), starts

    def fused_moves(self, code_s, starts, c: int, i_base, p_base):
        """:func:`_move_counts` by :func:`_kernels.moves`."""
        n = code_s.numel()
        src = torch.empty(n, dtype=torch.long)
        i_src, p_src, hit, i_c, p_c = torch.empty(5, n, dtype=torch.float64)
        _kernels.moves(code_s.numpy(), starts.numpy(), c, i_base.numpy(), p_base.numpy(), src.numpy(),
                       i_src.numpy(), p_src.numpy(), hit.numpy(), i_c.numpy(), p_c.numpy())
        return src, i_src, p_src, hit, i_c, p_c


def bounded_search(form: CountReward, tau, code, c: int, label_area, current: float, current_reward: float,
                   bound: float | None, tol: float, nb: int | None = None,
                   work: SearchWork | None = None, t_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The exact best interval without sorting all thresholds (branch and bound).

    ``code``: the pixels' :func:`src_state` codes. The thresholds are binned (``nb`` bins, monotone
    in ``tau``, so "every pixel of bins ``< e`` has moved" is a reachable state for each edge
    ``e``); one histogram gives the exact reward at every edge. Inside a bin the counts of each
    class stay between their values at the bin's two edges, which bounds the reward there
    (:func:`_upper_bound`); only bins whose bound beats the best reward found are sorted and
    searched exactly. Every pass over the pixels is a tensor op; the host reads the thresholds'
    range, the promising groups of bins and bins, the number of pixels in those bins and the
    result (see ``tests``: a fixed number of reads per step, whatever the number of pixels).
    ``work``: buffers for the ``[M]`` arrays (and the fused CPU loops); ``t_range``: the
    thresholds' ``(min, max)`` when already known. With the fused loops and the plain mIoU,
    everything after the histogram is one loop (:func:`_search_kernel.miou_search`, the same numbers).
    """
    m, num_classes, dev = tau.numel(), label_area.numel(), tau.device
    lab = label_area.to(torch.float64)
    nb = -(-(nb or int(min(4096, max(64, m // 128)))) // _GROUP) * _GROUP  # a multiple of _GROUP
    if t_range is None:
        t_lo, t_hi = torch.aminmax(tau)
        t_lo, t_hi = torch.stack([t_lo, t_hi]).tolist()
    else:
        t_lo, t_hi = t_range
    eps = _eps_of_range(t_lo, t_hi)
    if not t_hi - t_lo > eps:
        src, state = code.div(3, rounding_mode="floor"), code.remainder(3)
        target = torch.where(state == 2, c, torch.where(state == 1, src, -1))
        lo, hi, reward = reward_curve(form, tau, src, target, c, label_area, eps=eps)
        return _best_interval(reward, lo, hi, current, current_reward, bound, tol, eps)
    work = work or SearchWork(m, dev)
    inf = float("inf")
    # (tau - t_lo) / width >= 0: truncation (the float -> int copy) is the floor.
    if work.fused:  # two loops: bins, histogram, each bin's extreme thresholds; the edge counts
        idx, t_max, t_min, p_e, i_e, size = work.fused_bins(tau, code, t_lo, (t_hi - t_lo) / nb, nb, num_classes, c)
        lanes = _search_kernel.sum_lanes(num_classes) if form.parts == ((_miou_terms, 1.0),) else 0
        if lanes:  # the plain mIoU: the rest of the step in one loop (the same numbers, see _search_kernel)
            return _search_kernel.miou_search(
                tau.numpy(), code.numpy(), idx.numpy(), t_max.numpy(), t_min.numpy(), p_e.numpy(), i_e.numpy(),
                size.numpy(), lab.numpy(), c, _GROUP, eps, tol, bound is not None, float(bound or 0.0), float(current),
                float(current_reward), EDGE_MARGIN, lanes, *work.scratch(m))
    else:
        scaled, idx, key, flag_of = work.take(m)
        idx.copy_(torch.sub(tau, t_lo, out=scaled).div_((t_hi - t_lo) / nb)).clamp_(max=nb - 1)
        h = count(torch.mul(idx, 3 * num_classes, out=key).add_(code), nb * num_classes * 3)
        t_max = torch.full((nb,), -inf, dtype=tau.dtype, device=dev).scatter_reduce_(0, idx, tau, "amax")
        t_min = torch.full((nb,), inf, dtype=tau.dtype, device=dev).scatter_reduce_(0, idx, tau, "amin")
        # Per (bin, source class, state: label neither / the source / c), running over the bins
        # from a zero row: [nb + 1, C, 3]; the moves out of each class, its hits lost, c's hits gained.
        h = torch.cumsum(h.view(nb, num_classes, 3), 0).to(torch.float64)
        h = torch.cat([h.new_zeros(1, num_classes, 3), h])
        lost, into = h[..., 1], h[..., 2]  # (sums over a last dim of 3 are slow on a CPU: added by hand)
        moved, into_c = h[..., 0] + lost + into, into.sum(-1)
        p_e, i_e = moved[-1] - moved, lost[-1] - lost  # counts at every edge e (bins < e moved): [nb + 1, C]
        p_e[:, c], i_e[:, c] = moved.sum(-1), into_c
    # The offsets that give edge e's state: (largest tau below it, smallest tau at or above it).
    below = torch.cat([t_max.new_full((1,), -inf), torch.cummax(t_max, 0).values])
    above = torch.cat([torch.flip(torch.cummin(torch.flip(t_min, [0]), 0).values, [0]), t_min.new_full((1,), inf)])

    def usable(reward, lo, hi):  # rewards of the intervals an offset may be chosen in
        if bound is not None:
            lo, hi = lo.clamp(min=-bound), hi.clamp(max=bound)
        return torch.where(hi - lo > eps, reward, torch.full_like(reward, -inf))

    def bound_between(e0, e1):  # the reward bound of every state between edges e0 and e1 (counts monotone)
        return _upper_bound(form, torch.maximum(i_e[e0], i_e[e1]), torch.minimum(p_e[e0], p_e[e1]), lab)

    # Two levels: the reward at every g-th edge and a bound per group of g bins between them; only
    # the groups whose bound beats the best reward found get their inner edges' rewards and a bound
    # per bin (the [nb + 1, C] rewards and bounds of every edge cost more than the rest of the step).
    g = _GROUP  # nb is a multiple of it
    coarse = torch.arange(0, nb + 1, g, device=dev)
    coarse_reward, c_lo, c_hi = reward_from_counts(form, i_e[coarse], p_e[coarse], lab), below[coarse], above[coarse]
    lows, highs, rewards = [c_lo], [c_hi], [coarse_reward]
    best = usable(coarse_reward, c_lo, c_hi).max().clamp(min=current_reward)
    # Groups whose bound reaches within tol of the best: every edge a tie could choose is scored
    # (the same candidates as scoring every edge), and every bin whose bound beats best + tol.
    groups = torch.nonzero(bound_between(coarse[:-1], coarse[1:]) >= best - tol).flatten()
    fine = (groups.unsqueeze(1) * g + torch.arange(g, device=dev)).flatten()  # their bins, ascending
    inner = (groups.unsqueeze(1) * g + torch.arange(1, g, device=dev)).flatten()  # their edges between the coarse ones
    inner_reward, i_lo, i_hi = reward_from_counts(form, i_e[inner], p_e[inner], lab), below[inner], above[inner]
    lows.append(i_lo)
    highs.append(i_hi)
    rewards.append(inner_reward)
    if inner.numel():
        best = torch.maximum(best, usable(inner_reward, i_lo, i_hi).max())
    # Bounds inside each of their bins with two thresholds further apart than eps.
    ub = torch.where((t_max[fine] - t_min[fine]) > eps, bound_between(fine, fine + 1), torch.tensor(-inf, device=dev))
    # Every state inside the promising bins at once: their pixels in (bin, threshold) order, each
    # bin from its own lower edge. A move's state is reachable when the next pixel of its bin lies
    # more than eps above it (the others get reward -inf); the states at the bins' edges are
    # counted above. Host reads: which groups, which bins, and how many pixels they hold.
    bins = fine[ub > best + tol]
    if bins.numel():
        if work.fused:  # the bins' pixels by a counting sort on the bin, then a sort within each
            t_s, code_s, seg, starts = work.fused_gather(idx, tau, code, bins, size, nb)
            i_b, p_b = i_e[bins], p_e[bins]
            after = _after_moves(form, t_s, code_s, seg, c, lab, i_b, p_b, starts,
                                 work.fused_moves(code_s, starts, c, i_b, p_b))
        else:
            flag = torch.zeros(nb, dtype=torch.uint8, device=dev).index_fill_(0, bins, 1)
            sel = torch.nonzero(torch.index_select(flag, 0, idx, out=flag_of)).flatten()
            sel = sel[torch.argsort(tau[sel], stable=True)]  # bins are monotone in tau: also sorted by bin
            t_s = tau[sel]
            seg = torch.searchsorted(bins, idx[sel])
            after = _after_moves(form, t_s, code[sel], seg, c, lab, i_e[bins], p_e[bins])
        nxt = torch.cat([t_s[1:], t_s.new_tensor([inf])])
        same_bin = torch.cat([seg[1:] == seg[:-1], seg.new_zeros(1, dtype=torch.bool)])
        lows.append(t_s)
        highs.append(nxt)
        rewards.append(torch.where(same_bin & ((nxt - t_s) > eps), after, torch.full_like(after, -inf)))
    return _best_interval(torch.cat(rewards), torch.cat(lows), torch.cat(highs), current, current_reward, bound,
                          tol, eps)


def check_count_form(spec, num_classes: int, class_weights=None) -> CountReward:
    """The counts form of ``spec`` or a one-line error saying calibration needs a count reward."""
    from segreward.credit import count_form
    if isinstance(spec, CountReward):
        return spec
    try:
        return count_form(spec, num_classes, class_weights)
    except SegrewardError as e:
        raise SegrewardError(str(e).replace("which estimator 'local' and scope 'running' need",
                                            "which calibration needs")) from None
