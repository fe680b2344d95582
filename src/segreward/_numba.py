"""numba, when installed: fused CPU loops for the passes where tensor code reads the same arrays
many times (the exact calibration fit, the local estimator's credit). Optional (the ``fast``
extra); the tensor code is the reference, the GPU path, and what runs without numba.
``SEGREWARD_NUMBA=0`` turns the loops off."""

from __future__ import annotations

import os

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

import torch

__all__ = ["available", "usable", "jit"]


def available() -> bool:
    """Whether the fused loops can be used (numba installed and not turned off)."""
    return numba is not None and os.environ.get("SEGREWARD_NUMBA", "1").strip().lower() not in ("0", "false", "no")


def usable(t: torch.Tensor) -> bool:
    """Whether the fused loops take ``t``: numba available (:func:`available`), a CPU tensor, float32
    or float64. The one test every call site makes; anything else takes the tensor code."""
    return available() and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def jit(fn):
    """``numba.njit`` (cached on disk, no bounds checks, no fast-math: IEEE results as the tensor
    code's), or the plain function without numba."""
    return numba.njit(cache=True, nogil=True, boundscheck=False)(fn) if numba is not None else fn
