"""Keep freed memory for reuse: glibc ``malloc`` settings for a long-running PyTorch process on a CPU.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands large blocks back to the
operating system when they are freed (``mmap``/``munmap`` above a threshold, and trimming the top
of the heap), so the next tensor of the same size starts on fresh pages: one page fault per 4 KiB
the first time each page is written. A training or calibration step allocates and frees the same
multi-megabyte tensors over and over, and on a virtual machine a page fault is expensive: measured
here (``benchmarks/reward_step.py``, ``benchmarks/calibrate.py``; see ``docs/calibrate.md``), the
reward losses spent about half their time in page faults.

:func:`keep_freed_memory` raises glibc's ``mmap`` threshold to 1 GiB (32 MiB, the documented
64-bit maximum, where a glibc refuses more) and its trim threshold to 1 GiB, with ``mallopt``:
freed blocks stay in the process and are reused. It is
what PyTorch's CPU performance guide gets by preloading jemalloc or tcmalloc, without a preload;
the price is that a process keeps up to about 1 GiB of freed memory it would otherwise return.
segreward's own commands and benchmarks call it at start; ``SEGREWARD_MALLOC=default`` leaves
malloc as it is. Library users may call it once at the start of their program. Elsewhere than
Linux with glibc it does nothing. Numbers are unchanged: only where memory comes from.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "malloc_setting", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 2**30  # blocks below this come from the heap (and are reused) ...
MMAP_THRESHOLD_FALLBACK = 32 * 2**20  # ... or below glibc's documented 64-bit limit, where it keeps to it
TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_state: dict = {}


def _glibc():
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process: the C library's
        libc.gnu_get_libc_version, libc.mallopt  # noqa: B018 (attribute lookups: both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's thresholds so that freed memory is kept and reused (see the module doc).
    Idempotent; returns whether the settings are in effect (False: not glibc, or
    ``SEGREWARD_MALLOC=default``)."""
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if os.environ.get("SEGREWARD_MALLOC", "").strip().lower() != "default":
        libc = _glibc()
        if libc is not None:
            # Both: a fixed trim threshold alone also fixes the mmap threshold at its 128 KiB
            # default (glibc stops adapting it), which is slower than leaving both alone.
            mmap_ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or \
                bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK))
            applied = mmap_ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["applied"] = applied
    return applied


def malloc_setting() -> str:
    """What a benchmark records: ``keep-freed`` or ``default``."""
    return "keep-freed" if _state.get("applied") else "default"
