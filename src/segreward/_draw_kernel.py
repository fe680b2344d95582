"""Inverse-CDF draws of :func:`segreward.sampling.draw_from_probs` in one loop (numba, CPU): each
pixel's running sum of probabilities is built once and compared with its K uniforms, instead of
``C - 1`` passes over ``[K, B, H, W]``. The same float sums in the same order, so the same samples
(tested against the tensor code)."""

from __future__ import annotations

import numpy as np

from segreward._numba import jit

__all__ = ["draw"]


@jit
def _add_class(acc, pc, idx, u, b):
    """One class of image ``b``'s draws: the running sum ``acc += pc`` and, per sample ``k``,
    ``idx[k, b] += (acc <= u[k, b])`` (whole planes: contiguous, vectorised; called once per
    class and image, so passing arrays costs nothing measurable)."""
    q_n = acc.shape[0]
    for q in range(q_n):
        acc[q] = acc[q] + pc[q]
    for k in range(u.shape[0]):
        ik, uk = idx[k, b], u[k, b]
        for q in range(q_n):
            ik[q] += acc[q] <= uk[q]


@jit
def _max_class(best, arg, row, c):
    """One class of a running first maximum: where ``row > best``, ``best = row`` and ``arg = c``.
    ``arg`` is int32: a select between a float and a byte lane does not vectorise (5x slower,
    measured), nor do branches."""
    cc = np.int32(c)
    for q in range(best.shape[0]):
        take = row[q] > best[q]
        best[q] = row[q] if take else best[q]
        arg[q] = cc if take else arg[q]


@jit
def draw(p, u, zero, idx, arg, with_argmax):
    """``p [B, C, Q]``, ``u [K, B, Q]``; writes ``idx [K, B, Q]`` (the number of classes ``c < C-1``
    whose cumulative probability is ``<= u``) and, ``with_argmax``, ``arg [B, Q]`` (first maximum).
    Class by class over whole planes (contiguous, vectorisable), as the tensor code, without its
    ``[K, B, H, W]`` temporaries."""
    k_n, b_n, q_n = u.shape
    c_n = p.shape[1]
    acc = np.empty(q_n, dtype=p.dtype)
    best = np.empty(q_n, dtype=p.dtype)
    a32 = np.empty(q_n, dtype=np.int32)
    for b in range(b_n):
        for q in range(q_n):
            acc[q] = zero
        for k in range(k_n):
            ik = idx[k, b]
            for q in range(q_n):
                ik[q] = 0
        for c in range(c_n - 1):
            _add_class(acc, p[b, c], idx, u, b)
        if with_argmax:
            ab = arg[b]
            p0 = p[b, 0]
            for q in range(q_n):
                best[q] = p0[q]
                a32[q] = 0
            for c in range(1, c_n):
                _max_class(best, a32, p[b, c], c)
            for q in range(q_n):
                ab[q] = a32[q]


@jit
def draw_scored(p, z, u, target, ignore, logp, lse, idx, log_prob, confusion, greedy, entropy):
    """The estimators' forward pass over the policy in one sweep per image (numba, CPU).

    In: ``p [B, C, Q]`` (the policy), ``z [B, C, Q]`` (its logits over the temperature: the
    greedy prediction is their first maximum, as :func:`segreward.sampling.first_argmax`),
    ``u [K, B, Q]`` uniforms, ``target [B, Q]`` (``ignore`` or a class id), and either
    ``logp [B, C, Q]`` (the sampled estimator: ``log p``) or, with ``logp`` empty, ``lse [B, Q]``
    (the local estimator: ``log sum exp z``).

    Out: ``idx [K, B, Q]`` (uint8; int32 beyond 256 classes), the draws of :func:`draw` (the same
    sums and comparisons, so the same samples); ``confusion [K, B, C, C]`` (label row, sample
    column) and ``greedy [B, C, C]`` over labelled pixels; ``entropy [B]`` float64, the sum over
    labelled pixels of each pixel's entropy, ``-sum_c p max(log p, lowest)`` (with ``logp``) or
    ``lse - sum_c p max(z, lowest)`` (without: no log of a zero probability; a -inf clamped, as 0 *
    -inf is NaN), each pixel's sum in class order in ``p``'s dtype, as the tensor code's; with
    ``logp``, ``log_prob [K, B]`` float64, the sum of ``logp`` at each sample over labelled pixels.
    Counts accumulate into the given arrays (zeros on entry).

    Class by class over whole planes, as :func:`draw` (the running maximum by :func:`_max_class`)."""
    k_n, b_n, q_n = u.shape
    c_n = p.shape[1]
    with_logp = logp.shape[0] > 0
    lowest = np.finfo(z.dtype).min
    acc = np.empty(q_n, dtype=p.dtype)
    ent = np.empty(q_n, dtype=p.dtype)
    best = np.empty(q_n, dtype=z.dtype)
    arg = np.empty(q_n, dtype=np.int32)
    lp = np.empty(k_n)  # this image's sums, off the output arrays
    cm = np.empty((k_n, c_n * c_n), dtype=np.int64)
    gm = np.empty(c_n * c_n, dtype=np.int64)
    for b in range(b_n):
        p0, z0 = p[b, 0], z[b, 0]
        for q in range(q_n):
            acc[q] = p0[q] - p0[q]  # 0 in p's dtype
            best[q] = z0[q]
            arg[q] = 0
        if with_logp:
            l0 = logp[b, 0]
            for q in range(q_n):
                ent[q] = p0[q] * max(l0[q], lowest)
        else:
            for q in range(q_n):
                ent[q] = p0[q] * max(z0[q], lowest)
        for k in range(k_n):
            ik = idx[k, b]
            for q in range(q_n):
                ik[q] = 0
        for c in range(c_n):
            pc = p[b, c]
            if c < c_n - 1:
                _add_class(acc, pc, idx, u, b)
            if c > 0:
                zc = z[b, c]
                if with_logp:
                    lc = logp[b, c]
                    for q in range(q_n):
                        ent[q] = ent[q] + pc[q] * max(lc[q], lowest)
                else:
                    for q in range(q_n):
                        ent[q] = ent[q] + pc[q] * max(zc[q], lowest)
                _max_class(best, arg, zc, c)
        tb = target[b]
        total = 0.0
        lp[:] = 0.0
        cm[:] = 0
        gm[:] = 0
        for q in range(q_n):
            t = tb[q]
            if t != ignore:
                total += -ent[q] if with_logp else lse[b, q] - ent[q]
                row = t * c_n
                gm[row + arg[q]] += 1
                for k in range(k_n):
                    s = idx[k, b, q]
                    cm[k, row + s] += 1
                    if with_logp:
                        lp[k] += logp[b, s, q]
        for k in range(k_n):
            if with_logp:
                log_prob[k, b] += lp[k]
            for i in range(c_n):
                for j in range(c_n):
                    confusion[k, b, i, j] += cm[k, i * c_n + j]
        for i in range(c_n):
            for j in range(c_n):
                greedy[b, i, j] += gm[i * c_n + j]
        entropy[b] = total


@jit
def draw_grad(p, idx, target, ignore, g, scale, out):
    """Backward of ``log_prob`` (:func:`draw_scored`) into the logits: ``out[b, c, q] = scale *
    (sum_k g[k, b] [idx[k, b, q] = c] - p[b, c, q] sum_k g[k, b])`` at labelled pixels, 0
    elsewhere (the gather's scatter and the log-softmax's backward in one pass); ``scale`` is
    ``1 / temperature``."""
    k_n, b_n, q_n = idx.shape
    c_n = p.shape[1]
    lab = np.empty(q_n, dtype=out.dtype)
    for b in range(b_n):
        gs = 0.0
        for k in range(k_n):
            gs += g[k, b]
        tb = target[b]
        for q in range(q_n):
            lab[q] = 1.0 if tb[q] != ignore else 0.0
        for c in range(c_n):
            pc, oc = p[b, c], out[b, c]
            for q in range(q_n):
                oc[q] = -(pc[q] * gs) * lab[q]
        for k in range(k_n):
            gk = g[k, b]
            ik = idx[k, b]
            for q in range(q_n):
                if tb[q] != ignore:
                    out[b, ik[q], q] += gk
        if scale != 1.0:
            for c in range(c_n):
                oc = out[b, c]
                for q in range(q_n):
                    oc[q] = oc[q] * scale
