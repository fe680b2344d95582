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

__all__ = ["prefix", "bins", "select", "rise", "fall", "top2"]


@_jit
def prefix(i1, i2, v1, v2, zk, t, k, first, src, best_other, tau, code):
    """Per pixel: ``first`` (``k`` is its best class), ``src`` (its best class other than ``k``),
    ``best_other`` (that class's score), ``tau = best_other - z_k`` and the code ``3 src + [t ==
    src] + 2 [t == k]``. Returns ``(min tau, max tau)``."""
    lo, hi = np.inf, -np.inf
    for r in range(i1.shape[0]):
        f = i1[r] == k
        first[r] = f
        s = i2[r] if f else i1[r]
        bo = v2[r] if f else v1[r]
        src[r] = s
        best_other[r] = bo
        x = bo - np.float64(zk[r])
        tau[r] = x
        lo = min(lo, x)
        hi = max(hi, x)
        lab = t[r]
        code[r] = 3 * s + (1 if lab == s else 0) + (2 if lab == k else 0)
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
    for r in range(tau.shape[0]):
        x = tau[r]
        j = np.int64((x - t_lo) / width)
        if j > nb - 1:
            j = nb - 1
        idx[r] = j
        hist[j * stride + code[r]] += 1
        if x > t_max[j]:
            t_max[j] = x
        if x < t_min[j]:
            t_min[j] = x


@_jit
def select(idx, flag, out):
    """The pixels whose bin is flagged, in pixel order, written to ``out``; returns how many."""
    n = 0
    for r in range(idx.shape[0]):
        if flag[idx[r]]:
            out[n] = r
            n += 1
    return n


@_jit
def rise(zk, value, k, best_other, src, v1, i1, v2, i2):
    """``b_k`` raised to ``value``: each pixel's top two with ``x = z_k + value`` (``_Top2.set``)."""
    for r in range(zk.shape[0]):
        x = np.float64(zk[r]) + value
        bo = best_other[r]
        s = src[r]
        wins = x > bo or (x == bo and k < s)
        second = x > v2[r] or (x == v2[r] and k < i2[r])
        if wins:
            i2[r] = s
        elif second:
            i2[r] = k
        i1[r] = k if wins else s
        v2[r] = min(max(x, v2[r]), bo)
        v1[r] = max(x, bo)


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
def fall(zc, b, value, k, first, best_other, src, v1, i1, v2, i2):
    """``b_k`` lowered to ``value`` (``b`` already holds it): where ``k`` stays the best only its
    score changes; where it was one of the two and falls below the other, the row is recomputed."""
    zk = zc[k]
    for r in range(zk.shape[0]):
        x = np.float64(zk[r]) + value
        bo = best_other[r]
        f = first[r]
        wins = x > bo or (x == bo and k < src[r])
        if f:
            v1[r] = x
        if (f or i2[r] == k) and not wins:
            a, ia, c2, ic = _row_top2(zc, b, r)
            v1[r], i1[r], v2[r], i2[r] = a, ia, c2, ic


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
