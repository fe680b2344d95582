"""Inverse-CDF draws of :func:`segreward.sampling.draw_from_probs` in one loop (numba, CPU): each
pixel's running sum of probabilities is built once and compared with its K uniforms, instead of
``C - 1`` passes over ``[K, B, H, W]``. The same float sums in the same order, so the same samples
(tested against the tensor code)."""

from __future__ import annotations

import numpy as np

from segreward._numba import jit

__all__ = ["draw"]


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
    for b in range(b_n):
        for q in range(q_n):
            acc[q] = zero
        for k in range(k_n):
            ik = idx[k, b]
            for q in range(q_n):
                ik[q] = 0
        for c in range(c_n - 1):
            pc = p[b, c]
            for q in range(q_n):
                acc[q] = acc[q] + pc[q]
            for k in range(k_n):
                ik, uk = idx[k, b], u[k, b]
                for q in range(q_n):
                    ik[q] += acc[q] <= uk[q]
        if with_argmax:
            ab = arg[b]
            p0 = p[b, 0]
            for q in range(q_n):
                best[q] = p0[q]
                ab[q] = 0
            for c in range(1, c_n):
                pc = p[b, c]
                for q in range(q_n):
                    if pc[q] > best[q]:
                        best[q] = pc[q]
                        ab[q] = c
