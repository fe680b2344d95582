"""The local estimator's credit for every class of every pixel in one loop (numba, CPU).

:func:`segreward.credit.credit_table` builds ``credit[b, c, h, w]`` from small per-(group, class)
tables with about ten ``[B, C, H, W]`` tensor passes per sample, and the surrogate then multiplies
by the probabilities. :func:`credit_and_weighted` does the same arithmetic pixel by pixel (float32
or float64 as the tensors, the same operations in the same order, so the same bits; tested
against the tensor code) and writes the K-sample mean credit and ``p * credit`` once.
"""

from __future__ import annotations

import numpy as np

from segreward._numba import jit

__all__ = ["credit_and_weighted"]


@jit
def _add_into(dst, src):
    """``dst += src`` for ``[C, Q]`` planes, row by row (the tensor code's ``add_``)."""
    for c in range(dst.shape[0]):
        row, add = dst[c], src[c]
        for q in range(dst.shape[1]):
            row[q] = row[q] + add[q]


@jit
def credit_and_weighted(p, samples, target, valid, group, tables, den, wpart, multi, consts, credit, weighted, diag):
    """``p [B, C, Q]``; ``samples [K, B, Q]``; ``target [B, Q]`` (a class where ignored);
    ``valid [B, Q]``; ``group [B]``; ``tables [K, P, 8, G, C]``: per sample and reward part the
    leaving (miss/hit numerator, miss/hit denominator) and entering (miss numerator, miss
    denominator, hit numerator, hit denominator) tables; ``den [K, P, G]``; ``wpart [P]`` the
    parts' weights (used when ``multi``); ``consts``: ``[0, inf, K]`` in the tensors' dtype. Writes
    ``credit`` (mean over the K samples, 0 for the sampled class) and ``weighted = p * credit``,
    both ``[B, C, Q]``, and per image the diagnostics ``diag [B, 2]`` (float64): the sum of
    ``|credit|`` (in float64) and the number of labelled pixels whose
    label's credit is > 0. Class planes are written whole (contiguous, vectorised loops); per-pixel
    values (the leaving terms, the label's and the sample's entries) in loops over the pixels."""
    k_n, b_n, q_n = samples.shape
    c_n = p.shape[1]
    parts = tables.shape[1]
    zero, inf, kf = consts[0], consts[1], consts[2]  # every scalar in the tensors' dtype: no float64 promotion
    xs = np.empty(q_n, dtype=credit.dtype)
    ys = np.empty(q_n, dtype=credit.dtype)
    cur_buf = np.empty((c_n, q_n), dtype=credit.dtype)
    part_buf = np.empty((c_n, q_n), dtype=credit.dtype)
    for b in range(b_n):
        g = group[b]
        out = credit[b]
        for j in range(k_n):
            cur = out if j == 0 else cur_buf  # sample 0 straight into the output, later ones added to it
            for pi in range(parts):
                plane = cur if pi == 0 else part_buf
                # Leaving the sampled class: x = dA_out - R dB_out, y = Den + dB_out (ignored: 0, inf).
                for q in range(q_n):
                    sq = samples[j, b, q]
                    if valid[b, q]:
                        if sq == target[b, q]:
                            xs[q] = tables[j, pi, 1, g, sq]
                            ys[q] = tables[j, pi, 3, g, sq] + den[j, pi, g]
                        else:
                            xs[q] = tables[j, pi, 0, g, sq]
                            ys[q] = tables[j, pi, 2, g, sq] + den[j, pi, g]
                    else:
                        xs[q] = zero
                        ys[q] = inf
                # Entering class c (label miss), then the label's own class (hit) over it.
                for c in range(c_n):
                    a_num = tables[j, pi, 4, g, c]
                    a_den = tables[j, pi, 5, g, c]
                    row = plane[c]
                    for q in range(q_n):
                        row[q] = (xs[q] + a_num) / (ys[q] + a_den)
                for q in range(q_n):
                    t = target[b, q]
                    plane[t, q] = (xs[q] + tables[j, pi, 6, g, t]) / (ys[q] + tables[j, pi, 7, g, t])
                if multi:
                    w = wpart[pi]
                    for c in range(c_n):
                        row = plane[c]
                        for q in range(q_n):
                            row[q] = row[q] * w
                if pi > 0:
                    _add_into(cur, part_buf)
            for q in range(q_n):
                cur[samples[j, b, q], q] = zero
            if j > 0:
                _add_into(out, cur_buf)
        total = 0.0
        for c in range(c_n):
            row, pr, wr = out[c], p[b, c], weighted[b, c]
            if k_n > 1:
                for q in range(q_n):
                    row[q] = row[q] / kf
            for q in range(q_n):
                wr[q] = pr[q] * row[q]
            for q in range(q_n):
                total += abs(row[q])
        pos = 0
        for q in range(q_n):
            pos += valid[b, q] and out[target[b, q], q] > zero
        diag[b, 0] = total
        diag[b, 1] = pos
