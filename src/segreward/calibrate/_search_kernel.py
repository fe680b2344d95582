"""The rest of one exact step of the plain mIoU as one numba loop: what ``search.bounded_search``
does with its tensors once the thresholds are binned (:func:`_kernels.bins`, :func:`_kernels.edges`).

That part is about a hundred small tensor operations per step (rewards and bounds at the bin
edges, the promising groups and bins, the intervals' best), each costing more to launch than its
arithmetic: together about a third of a fit. :func:`miou_search` does the same arithmetic in one
call and returns the same offset and reward, bit for bit (``tests/test_calibrate_kernels.py``).

One thing the tensor code leaves to torch is the order of a sum over the classes (``.sum(-1)``):
torch's CPU sum splits a row into vector lanes and partial sums (``cascade_sum``), so its result
can differ from a left-to-right sum in the last bit. :func:`row_sum` replays that order for a
given vector width; :func:`sum_lanes` finds the width this torch uses by comparing the two on
random rows, and when none matches the step keeps the tensor code (the offsets stay bit-equal
whatever the machine).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from segreward._numba import jit as _jit
from segreward.calibrate._kernels import _miou_terms, gather, miou_after_moves, moves

__all__ = ["row_sum", "sum_lanes", "miou_search"]


@_jit
def row_sum(x, lanes, acc):
    """The sum of ``x`` in the order of torch's CPU ``sum`` over a contiguous last dim
    (``aten/src/ATen/native/cpu/SumKernel.cpp``): rows of at least ``lanes`` elements are read as
    vectors of ``lanes`` lanes, shorter ones as scalars (``lanes`` 1). Either way the units go round
    4 partial sums (instruction-level parallelism), which a cascade of 4 levels adds up every
    ``16**j`` groups (``multi_row_sum``); then the units left over join partial 0, the partials are
    added in order, and for vectors the elements left over go first into the scalar total, then
    the lanes. ``acc``: float64 scratch of ``16 * lanes``."""
    n = x.shape[0]
    w = lanes if (lanes > 1 and n >= lanes) else 1
    units = n // w
    for q in range(16 * w):
        acc[q] = 0.0
    groups = units // 4
    if groups <= 2:  # CeilLog2
        log2 = 1
    else:
        v, log2 = groups - 1, 0
        while v > 0:
            v >>= 1
            log2 += 1
    power = max(4, log2 // 4)
    step = 1 << power
    i = 0
    while i + step <= groups:
        for _ in range(step):
            for q in range(4 * w):
                acc[q] += x[i * 4 * w + q]
            i += 1
        for j in range(1, 4):  # carry level j - 1 into level j, until the group count is not a multiple
            for q in range(4 * w):
                acc[j * 4 * w + q] += acc[(j - 1) * 4 * w + q]
                acc[(j - 1) * 4 * w + q] = 0.0
            if (i & ((step - 1) << (j * power))) != 0:
                break
    while i < groups:
        for q in range(4 * w):
            acc[q] += x[i * 4 * w + q]
        i += 1
    for j in range(1, 4):
        for q in range(4 * w):
            acc[q] += acc[j * 4 * w + q]
    for u in range(groups * 4, units):  # units left over: partial 0
        for q in range(w):
            acc[q] += x[u * w + q]
    for k in range(1, 4):
        for q in range(w):
            acc[q] += acc[k * w + q]
    if w == 1:
        return acc[0]
    total = 0.0
    for e in range(units * w, n):
        total += x[e]
    for q in range(w):
        total += acc[q]
    return total


@functools.lru_cache(maxsize=None)
def sum_lanes(length: int) -> int:
    """The vector width for which :func:`row_sum` equals torch's ``sum(-1)`` on rows of
    ``length`` float64 values here (AVX2: 4, AVX-512: 8, NEON: 2), or 0 when none does. Checked
    on random rows of very different magnitudes (the order is the same for any data)."""
    g = torch.Generator().manual_seed(length)
    x = torch.rand(64, length, generator=g, dtype=torch.float64) * torch.exp(
        4 * torch.randn(64, length, generator=g, dtype=torch.float64))
    want = x.sum(-1).tolist()
    rows = x.numpy()
    for lanes in (4, 8, 2, 16, 1):
        acc = np.empty(16 * lanes)
        if all(row_sum(rows[r], lanes, acc) == want[r] for r in range(rows.shape[0])):
            return lanes
    return 0


@_jit
def _terms_row(i_row, p_row, lab, a, b, floor_p):
    """``credit._miou_terms`` of every class: ``a``, ``b [C]`` (``floor_p``: ``p`` clamped at 0 first)."""
    for k in range(lab.shape[0]):
        p = max(p_row[k], 0.0) if floor_p else p_row[k]
        a[k], b[k] = _miou_terms(i_row[k], p, lab[k])


@_jit
def _reward(i_row, p_row, lab, lanes, a, b, acc):
    """``reward_from_counts`` of the plain mIoU: ``sum a / sum b``, 0 where ``sum b`` is 0."""
    _terms_row(i_row, p_row, lab, a, b, False)
    num, den = row_sum(a, lanes, acc), row_sum(b, lanes, acc)
    return num / den if den > 0 else 0.0


@_jit
def _bound(i_e, p_e, e0, e1, lab, lanes, i_hi, p_lo, a, b, acc):
    """``search._upper_bound`` between edges ``e0`` and ``e1``: the terms at the larger intersection
    and the smaller area of the two, ``inf`` where the classes' ``b`` sum to 0."""
    for k in range(lab.shape[0]):
        i_hi[k] = max(i_e[e0, k], i_e[e1, k])
        p_lo[k] = min(p_e[e0, k], p_e[e1, k])
    _terms_row(i_hi, p_lo, lab, a, b, True)
    num, den = row_sum(a, lanes, acc), row_sum(b, lanes, acc)
    return num / den if den > 0 else np.inf


@_jit
def _usable(r, lo, hi, has_bound, bound, eps):
    """The reward of an interval an offset may be chosen in (clipped to the bound), else ``-inf``."""
    if has_bound:
        lo, hi = max(lo, -bound), min(hi, bound)
    return r if hi - lo > eps else -np.inf


@_jit
def miou_search(tau, code, idx, t_max, t_min, p_e, i_e, size, lab, c, group, eps, tol, has_bound, bound,
                current, current_reward, margin, lanes, t_s, code_s, after):
    """``bounded_search`` for the plain mIoU from the binned thresholds: ``(offset, reward)``.

    The rewards at every ``group``-th edge and a bound per group of bins; the inner edges of the
    groups whose bound reaches the best found less ``tol``, and the pixels of their bins whose own
    bound beats it by more than ``tol`` (gathered and sorted by :func:`_kernels.gather`), moved one
    by one from their bin's lower edge (:func:`_kernels.moves`, :func:`_kernels.miou_after_moves`); then
    the middle of the best interval, the one nearest ``current`` among those within ``tol`` of it
    (``search._best_interval``). Candidates are taken in the tensor code's order (the coarse
    edges, the inner edges, the moves), every value by the same float64 operations.
    ``t_s``, ``code_s``, ``after``: ``[M]`` scratch."""
    nb, nc = size.shape[0], lab.shape[0]
    inf = np.inf
    a, b = np.empty(nc), np.empty(nc)
    i_hi, p_lo = np.empty(nc), np.empty(nc)
    acc = np.empty(16 * max(lanes, 1))
    below, above = np.empty(nb + 1), np.empty(nb + 1)  # the offsets that give each edge's state
    run = -inf
    below[0] = run
    for e in range(nb):
        run = max(run, t_max[e])
        below[e + 1] = run
    run = inf
    above[nb] = run
    for e in range(nb - 1, -1, -1):
        run = min(run, t_min[e])
        above[e] = run
    # the edges' candidates: coarse ones first, then the inner ones of the promising groups
    n_groups = nb // group
    cand_e = np.empty(nb + 1, dtype=np.int64)
    cand_r = np.empty(nb + 1)
    n_cand = 0
    best = -inf
    for j in range(n_groups + 1):
        e = j * group
        r = _reward(i_e[e], p_e[e], lab, lanes, a, b, acc)
        cand_e[n_cand], cand_r[n_cand] = e, r
        n_cand += 1
        best = max(best, _usable(r, below[e], above[e], has_bound, bound, eps))
    best = max(best, current_reward)
    promising = np.empty(n_groups, dtype=np.int64)
    n_prom = 0
    for j in range(n_groups):
        if _bound(i_e, p_e, j * group, (j + 1) * group, lab, lanes, i_hi, p_lo, a, b, acc) >= best - tol:
            promising[n_prom] = j
            n_prom += 1
    inner_best = -inf
    for q in range(n_prom):
        for e in range(promising[q] * group + 1, (promising[q] + 1) * group):
            r = _reward(i_e[e], p_e[e], lab, lanes, a, b, acc)
            cand_e[n_cand], cand_r[n_cand] = e, r
            n_cand += 1
            inner_best = max(inner_best, _usable(r, below[e], above[e], has_bound, bound, eps))
    if n_prom:
        best = max(best, inner_best)
    # the bins worth searching pixel by pixel
    bins = np.empty(nb, dtype=np.int64)
    n_bins = 0
    for q in range(n_prom):
        for f in range(promising[q] * group, (promising[q] + 1) * group):
            if t_max[f] - t_min[f] > eps and _bound(i_e, p_e, f, f + 1, lab, lanes, i_hi, p_lo, a, b, acc) > best + tol:
                bins[n_bins] = f
                n_bins += 1
    n = 0
    starts = np.zeros(n_bins + 1, dtype=np.int64)
    if n_bins:
        seg_of_bin = np.full(nb, -1, dtype=np.int64)
        for s in range(n_bins):
            seg_of_bin[bins[s]] = s
            starts[s + 1] = starts[s] + size[bins[s]]
        n = starts[n_bins]
        gather(idx, tau, code, seg_of_bin, starts, t_s, code_s)
        # each move's counts and reward (the fallback's loops), the segments' bases summed here
        i_b, p_b = np.empty((n_bins, nc)), np.empty((n_bins, nc))
        base_a, base_b = np.empty(n_bins), np.empty(n_bins)
        for s in range(n_bins):
            e = bins[s]
            i_b[s], p_b[s] = i_e[e], p_e[e]
            _terms_row(i_e[e], p_e[e], lab, a, b, False)
            base_a[s] = row_sum(a, lanes, acc) - a[c]
            base_b[s] = row_sum(b, lanes, acc) - b[c]
        src = np.empty(n, dtype=np.int64)
        i_src, p_src, hit, i_c, p_c = np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
        moves(code_s[:n], starts, c, i_b, p_b, src, i_src, p_src, hit, i_c, p_c)
        miou_after_moves(src, i_src, p_src, hit, i_c, p_c, lab, c, starts, base_a, base_b, after[:n])
        for s in range(n_bins):  # reachable when the next pixel of its bin lies more than eps above
            for j in range(starts[s], starts[s + 1]):
                if j + 1 == starts[s + 1] or not (t_s[j + 1] - t_s[j] > eps):
                    after[j] = -inf
    # the best interval (search._best_interval over the candidates in order)
    top = -inf
    for q in range(n_cand):
        e = cand_e[q]
        top = max(top, _usable(cand_r[q], below[e], above[e], has_bound, bound, eps))
    for j in range(n):
        hi = t_s[j + 1] if j + 1 < n else inf
        top = max(top, _usable(after[j], t_s[j], hi, has_bound, bound, eps))
    if not top > current_reward + tol:
        return current, current_reward
    best_d, best_x, best_r = inf, current, -inf
    for q in range(n_cand + n):
        if q < n_cand:
            lo, hi, r = below[cand_e[q]], above[cand_e[q]], cand_r[q]
        else:
            j = q - n_cand
            lo, hi, r = t_s[j], (t_s[j + 1] if j + 1 < n else inf), after[j]
        if has_bound:
            lo, hi = max(lo, -bound), min(hi, bound)
        r = r if hi - lo > eps else -inf
        if not r >= top - tol:
            continue
        if lo == -inf:
            x = current if hi == inf else hi - margin
        elif hi == inf:
            x = lo + margin
        else:
            x = 0.5 * (lo + hi)
        d = abs(x - current)
        if d < best_d:  # the first of equal distances, as argmin
            best_d, best_x, best_r = d, x, r
    return best_x, best_r
