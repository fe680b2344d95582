"""Fused CPU loops of the exact fit (numba): the same numbers as the tensor code, in fewer passes.

Each coordinate step of :func:`segreward.calibrate.exact.fit_pixels` needs, for every labelled
pixel, its best class other than ``k`` and its threshold ``tau``, a histogram of the thresholds,
and afterwards an update of each pixel's top two classes. As tensor operations that is about 30
passes over the ``M`` pixels per step (each op reads and writes whole arrays); here it is three
loops (:func:`prefix`, :func:`bins`, :func:`rise` / :func:`fall`) that read each array once.

Every value is computed by the same IEEE float64 operations in the same order as the tensor code
(``float64(z) + b``, ``best - z``, ``(tau - lo) / width`` truncated), ties broken the same way
(first maximum, like ``argmax``), so the offsets are bit-equal (``tests/test_calibrate_kernels.py``
runs both paths). Used for CPU tensors when numba is installed (the ``fast`` extra);
``SEGREWARD_NUMBA=0`` turns it off. CUDA tensors always take the tensor code.
"""

from __future__ import annotations

import numpy as np

from segreward._numba import jit as _jit

__all__ = ["prefix", "bins", "edges", "gather", "moves", "rise", "fall", "top2", "stream_pass", "confusion", "pair_counts", "miou_after_moves"]


@_jit
def _pixel(i1, i2, v1, v2, z, lab, k):
    """A pixel's threshold for class ``k``, ``tau = best_other - z_k`` (``best_other``: the score of
    its best class other than ``k``, ``src``), and its code ``3 src + [t == src] + 2 [t == k]``,
    from its top two ``(v1, i1, v2, i2)``, ``z_k`` and label. (Helpers take numbers, not arrays:
    an array argument costs reference counting per call, about 8x the loop.)"""
    f = i1 == k
    s = i2 if f else i1
    bo = v2 if f else v1
    return bo - np.float64(z), 3 * s + (1 if lab == s else 0) + (2 if lab == k else 0)


@_jit
def prefix(i1, i2, v1, v2, zk, t, k, tau, code):
    """Every pixel's threshold ``tau`` and code for class ``k`` (:func:`_pixel`). Returns
    ``(min tau, max tau)``, from a second loop: a running minimum in the first would chain every
    pixel to the one before and keep the loop from running several pixels at once (2x slower)."""
    for r in range(i1.shape[0]):
        tau[r], code[r] = _pixel(i1[r], i2[r], v1[r], v2[r], zk[r], t[r], k)
    return _extremes(tau)


@_jit
def _extremes(x):
    """``(min, max)`` of ``x`` by selects (the first of equal values, as ``min``/``max``)."""
    lo, hi = np.inf, -np.inf
    for r in range(x.shape[0]):
        v = x[r]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi


@_jit
def bins(tau, code, t_lo, width, nb, num_classes, idx, hist, t_max, t_min):
    """Bin ``floor((tau - t_lo) / width)`` (clamped to ``nb - 1``) of every threshold, the
    histogram over ``(bin, code)`` (``hist [nb * C * 3]``, zeroed here) and each bin's largest and
    smallest threshold (``-inf``/``inf`` where empty)."""
    hist[:] = 0
    t_max[:] = -np.inf
    t_min[:] = np.inf
    stride = 3 * num_classes
    top = nb - 1
    n = tau.shape[0]
    for r in range(n):  # the bins first, in a loop of their own: its divisions run several at once
        j = np.int64((tau[r] - t_lo) / width)
        idx[r] = j if j < top else top
    for r in range(n):
        j = np.int64(idx[r])
        x = tau[r]
        hist[j * stride + code[r]] += 1
        t_max[j] = max(t_max[j], x)  # no branch: thresholds come in no order, a branch mispredicts
        t_min[j] = min(t_min[j], x)


@_jit
def edges(hist, num_classes, c, p_e, i_e, size):
    """The counts at every bin edge from :func:`bins`'s histogram: ``p_e``, ``i_e [nb + 1, C]``
    (float64) the predicted area and intersection of each class once the pixels of bins ``< e``
    have moved into ``c``, and ``size [nb]`` the pixels per bin (``bounded_search``'s cumulative
    sums: integer counts, so the same numbers in any order)."""
    nb = size.shape[0]
    total_moved = np.zeros(num_classes, dtype=np.int64)  # per source class, every bin
    total_lost = np.zeros(num_classes, dtype=np.int64)
    for j in range(nb):
        for k in range(num_classes):
            base = (j * num_classes + k) * 3
            total_moved[k] += hist[base] + hist[base + 1] + hist[base + 2]
            total_lost[k] += hist[base + 1]
    moved = np.zeros(num_classes, dtype=np.int64)  # bins < e
    lost = np.zeros(num_classes, dtype=np.int64)
    into, moved_all = 0, 0
    for e in range(nb + 1):
        for k in range(num_classes):
            p_e[e, k] = total_moved[k] - moved[k]
            i_e[e, k] = total_lost[k] - lost[k]
        p_e[e, c] = moved_all  # class c holds every moved pixel
        i_e[e, c] = into
        if e == nb:
            break
        n = 0
        for k in range(num_classes):
            base = (e * num_classes + k) * 3
            m = hist[base] + hist[base + 1] + hist[base + 2]
            moved[k] += m
            lost[k] += hist[base + 1]
            into += hist[base + 2]
            n += m
        size[e] = n
        moved_all += n


@_jit
def gather(idx, tau, code, seg_of_bin, starts, t_s, code_s):
    """The pixels of the bins with ``seg_of_bin[bin] >= 0``, grouped by that segment (``starts
    [S + 1]``: where each begins) and sorted by threshold within it (stable: pixel order on ties),
    i.e. in the order of a stable sort by ``tau`` (bins are monotone in ``tau``): their thresholds
    ``t_s`` and codes ``code_s``."""
    nseg = starts.shape[0] - 1
    pos = starts[:nseg].copy()
    for r in range(idx.shape[0]):
        g = seg_of_bin[idx[r]]
        if g >= 0:
            q = pos[g]
            t_s[q] = tau[r]
            code_s[q] = code[r]
            pos[g] = q + 1
    _sort_segments(starts, t_s, code_s)


@_jit
def _sort_segments(starts, t_s, code_s):
    """Each segment of ``t_s`` sorted (stable), ``code_s`` along."""
    for g in range(starts.shape[0] - 1):
        a, b = starts[g], starts[g + 1]
        if b - a > 1:
            o = np.argsort(t_s[a:b], kind="mergesort")
            t_s[a:b] = t_s[a:b][o]
            code_s[a:b] = code_s[a:b][o]


@_jit
def moves(code_s, starts, c, i_base, p_base, src, i_src, p_src, hit, i_c, p_c):
    """Each move of ``search._after_moves`` in order: segment ``g`` (``starts``) starts from the
    counts ``i_base[g]``, ``p_base[g]`` and moves its pixels one by one from their source class
    into ``c``. Per move: the source ``src``, its counts after the move ``i_src``, ``p_src`` (before:
    ``+ hit``, ``+ 1``), whether it lost a hit, and class ``c``'s counts after it (integer counts
    in float64, the tensor code's numbers)."""
    num_classes = i_base.shape[1]
    ci = np.empty(num_classes, dtype=np.float64)
    cp = np.empty(num_classes, dtype=np.float64)
    for g in range(starts.shape[0] - 1):
        for k in range(num_classes):
            ci[k] = i_base[g, k]
            cp[k] = p_base[g, k]
        for j in range(starts[g], starts[g + 1]):
            s = code_s[j] // 3
            state = code_s[j] - 3 * s
            h = 1.0 if state == 1 else 0.0
            ci[s] -= h
            cp[s] -= 1.0
            if state == 2:
                ci[c] += 1.0
            cp[c] += 1.0
            src[j] = s
            i_src[j] = ci[s]
            p_src[j] = cp[s]
            hit[j] = h
            i_c[j] = ci[c]
            p_c[j] = cp[c]


@_jit
def rise(zk, value, k, v1, i1, v2, i2):
    """``b_k`` raised to ``value``: each pixel's top two with ``x = z_k + value`` (``_Top2.set``;
    ``src``, ``best_other``: its best class other than ``k`` and that score, before the change).
    Selects and non-short-circuit ``&``/``|`` only: no branch on the data (a branch per pixel
    mispredicts and keeps the loop from running several pixels at once: 2.4x slower)."""
    for r in range(zk.shape[0]):
        x = np.float64(zk[r]) + value
        a1, a2, w1, w2 = i1[r], i2[r], v1[r], v2[r]
        f = a1 == k
        s = a2 if f else a1
        bo = w2 if f else w1
        wins = (x > bo) | ((x == bo) & (k < s))
        second = (x > w2) | ((x == w2) & (k < a2))
        i2[r] = s if wins else (k if second else a2)
        i1[r] = k if wins else s
        m = w2 if w2 > x else x  # max(x, w2), min(m, bo), max(x, bo) as written: the first of equals
        v2[r] = bo if bo < m else m
        v1[r] = bo if bo > x else x


@_jit
def _row_top2(zc, b, r):
    """Top two ``(v1, i1, v2, i2)`` of ``float64(zc[:, r]) + b`` (first maximum on ties)."""
    c = zc.shape[0]
    best = np.float64(zc[0, r]) + b[0]
    ib = 0
    for j in range(1, c):
        s = np.float64(zc[j, r]) + b[j]
        if s > best:
            best, ib = s, j
    sec = -np.inf
    isec = -1
    for j in range(c):
        if j == ib:
            continue
        s = np.float64(zc[j, r]) + b[j]
        if isec < 0 or s > sec:
            sec, isec = s, j
    return best, ib, sec, isec


@_jit
def fall(zc, b, value, k, v1, i1, v2, i2):
    """``b_k`` lowered to ``value`` (``b`` already holds it): where ``k`` stays the best only its
    score changes. Where it was one of the two and falls below the other, the best is the old best
    of the others (``src``, ``best_other``) and the second the first maximum over every other
    class (``k`` at its new score included): one pass over the row, the numbers of a full top two."""
    zk = zc[k]
    nc = zc.shape[0]
    for r in range(zk.shape[0]):
        x = np.float64(zk[r]) + value
        a1, a2 = i1[r], i2[r]
        f = a1 == k
        s = a2 if f else a1
        bo = v2[r] if f else v1[r]
        wins = (x > bo) | ((x == bo) & (k < s))  # no short-circuit: see rise
        v1[r] = x if f else v1[r]
        # the rescan is _row_top2's second loop written out: a helper that takes the arrays made
        # this loop 1.75x slower
        if (f | (a2 == k)) and not wins:
            sec = -np.inf
            isec = -1
            for j in range(nc):
                if j == s:
                    continue
                y = np.float64(zc[j, r]) + b[j]
                if isec < 0 or y > sec:
                    sec, isec = y, j
            v1[r], i1[r], v2[r], i2[r] = bo, s, sec, isec


@_jit
def top2(zc, b, v1, i1, v2, i2):
    """Top two of every column of ``float64(zc) + b`` (``_Top2._full``)."""
    for r in range(zc.shape[1]):
        a, ia, c2, ic = _row_top2(zc, b, r)
        v1[r], i1[r], v2[r], i2[r] = a, ia, c2, ic


@_jit
def stream_pass(zc, t, b, bins, span, width, hist, confusion):
    """One streaming pass over pixels ``zc [C, P]`` with labels ``t [P]`` (``C``: ignored) at
    offsets ``b``: adds to ``confusion [C * C]`` (label x argmax) and to ``hist [C * (bins + 2) *
    C * 3]`` each (class, pixel) pair's threshold bin with its best other class and state
    (``stream._pass_counts``: the same float64 sums, thresholds and bins)."""
    c = zc.shape[0]
    nb = bins + 2
    s = np.empty(c, dtype=np.float64)
    for r in range(zc.shape[1]):
        lab = t[r]
        if lab == c:
            continue
        v1, i1, v2, i2 = _row_top2(zc, b, r)
        confusion[lab * c + i1] += 1
        for k in range(c):
            s[k] = np.float64(zc[k, r]) + b[k]
        code1 = i1 * 3 + (1 if lab == i1 else 0)
        code2 = i2 * 3 + (1 if lab == i2 else 0)
        d21 = v2 - v1
        for k in range(c):
            first = i1 == k
            m = 1.0 if first else 0.0
            tau = ((v1 - s[k]) + m * d21) + b[k]
            x = np.floor((tau - (b[k] - span)) / width) + 1.0
            if x < 0.0:
                x = 0.0
            elif x > bins + 1:
                x = bins + 1
            code = (code2 if first else code1) + (2 if lab == k else 0)
            hist[((k * nb + np.int64(x)) * c) * 3 + code] += 1


@_jit
def confusion(zc, t, b, best, arg, out):
    """Adds to ``out [C, C]`` (label x prediction) the prediction ``argmax_k float64(zc[k]) + b[k]``
    (first maximum on ties, as ``exact.argmax_major``) of pixels ``zc [C, M]`` with labels ``t``.
    Class by class over contiguous rows, the running index in int32 lanes and selects (vectorised);
    ``best [M]`` float64 and ``arg [M]`` int32 are scratch."""
    c_n, m = zc.shape
    z0, b0 = zc[0], b[0]
    for r in range(m):
        best[r] = np.float64(z0[r]) + b0
        arg[r] = 0
    for k in range(1, c_n):
        zk, bk, kk = zc[k], b[k], np.int32(k)
        for r in range(m):
            x = np.float64(zk[r]) + bk
            take = x > best[r]
            best[r] = x if take else best[r]
            arg[r] = kk if take else arg[r]
    pair_counts(t, arg, out)


@_jit
def pair_counts(t, pred, out):
    """Adds to ``out [C, C]`` the pixels of each (label ``t``, prediction ``pred``) pair."""
    for r in range(t.shape[0]):
        out[t[r], pred[r]] += 1


@_jit
def _miou_terms(i, p, lab):
    """``credit._miou_terms`` of one class's counts, as its tensor code computes them: ``u = (p +
    l) - i``; ``(i / max(u, 1), 1)`` where ``u > 0``, else ``(0, 0)``."""
    u = (p + lab) - i
    if u > 0:
        return i / max(u, 1.0), 1.0
    return 0.0, 0.0


@_jit
def miou_after_moves(src, i_src, p_src, hit, i_c, p_c, lab, c, starts, base_a, base_b, out):
    """``search._after_moves`` for the plain mIoU (one part, no class weight), from
    :func:`moves`'s counts: the reward after each move, ``out [n]``. The same float64 operations in
    the same order as the tensor code: the running sums of the source's term changes are one
    cumulative sum over every move less its value before the segment (``_running``), added to the
    segment's base (``base_a``/``base_b [S]``: the terms summed over the classes other than ``c``,
    from torch) and then ``c``'s terms."""
    lc = lab[c]
    cs_a, cs_b = 0.0, 0.0
    for g in range(starts.shape[0] - 1):
        before_a, before_b = cs_a, cs_b
        for j in range(starts[g], starts[g + 1]):
            ls = lab[src[j]]
            a_new, b_new = _miou_terms(i_src[j], p_src[j], ls)
            a_old, b_old = _miou_terms(i_src[j] + hit[j], p_src[j] + 1.0, ls)
            cs_a += a_new - a_old
            cs_b += b_new - b_old
            a_c, b_c = _miou_terms(i_c[j], p_c[j], lc)
            num = (base_a[g] + (cs_a - before_a)) + a_c
            den = (base_b[g] + (cs_b - before_b)) + b_c
            out[j] = num / den if den > 0 else 0.0
