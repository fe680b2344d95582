"""Host synchronisation in calibration's inner loops, counted without a GPU.

On a GPU every read of a device value by the host (``item``, ``tolist``, ``bool``/``float``/
``int`` of a tensor, ``nonzero``, ``unique``) waits for the device to finish. These tests patch
those entry points with counters and check that each exact 1-D step, each top-2 update and each
streaming batch makes a fixed, small number of reads, whatever the number of pixels: no read per
pixel, bin, class or candidate interval.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from segreward import _numba
from segreward.calibrate import exact
from segreward.calibrate.fit import fit_offsets
from segreward.calibrate.stream import ThresholdHistogram
from segreward.credit import count_form

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "unique")


@pytest.fixture(autouse=True)
def tensor_code(monkeypatch):
    """The tensor code (what runs on a GPU): the CPU's fused loops read host memory by design."""
    monkeypatch.setattr(_numba, "available", lambda: False)


@contextlib.contextmanager
def counting():
    """Count host reads of tensors (methods and the torch functions of the same names)."""
    counts = {"n": 0}
    saved = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts["n"] += 1
            return original(*args, **kwargs)
        saved.append((owner, name, original))
        setattr(owner, name, counted)

    for name in READS:
        if hasattr(torch.Tensor, name):
            wrap(torch.Tensor, name)
        if name in ("nonzero", "unique"):
            wrap(torch, name)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def reads_per_call(module, name, run):
    """``[reads]`` of each call of ``module.name`` while ``run()`` runs."""
    per_call = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        with counting() as c:
            out = original(*args, **kwargs)
        per_call.append(c["n"])
        return out
    setattr(module, name, counted)
    try:
        run()
    finally:
        setattr(module, name, original)
    return per_call


def biased(m, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, c, (m,), generator=g)
    z = 2.0 * torch.nn.functional.one_hot(t, c).float() + 1.5 * torch.randn(m, c, generator=g)
    z[:, 1] -= 1.0
    return z.t().reshape(1, c, m, 1), t.reshape(1, m, 1)


@pytest.mark.parametrize("m", [20_000, 80_000])
def test_each_exact_step_reads_the_device_a_fixed_number_of_times(m):
    logits, labels = biased(m)
    fit = lambda: fit_offsets(logits, labels, kfold=None, max_sweeps=3)  # noqa: E731
    steps = reads_per_call(exact, "bounded_search", fit)
    assert len(steps) >= 6
    # The thresholds' range, the promising groups of bins, the promising bins, their pixels, the
    # chosen interval.
    assert 2 <= min(steps) and max(steps) <= 5, steps  # (at least 2: the counters do count)
    updates = []
    original = exact._Top2.set

    def counted(self, *args):
        with counting() as c:
            original(self, *args)
        updates.append(c["n"])
    exact._Top2.set = counted
    try:
        fit()
    finally:
        exact._Top2.set = original
    assert updates and max(updates) <= 1, updates  # the rows to recompute when an offset falls


def test_the_whole_exact_fit_reads_per_step_not_per_pixel():
    per_step = []
    for m in (20_000, 80_000):
        logits, labels = biased(m)
        pixels = exact.pixel_set(logits, labels)
        steps = []
        original = exact.bounded_search

        def step(*args, **kwargs):
            steps.append(1)
            return original(*args, **kwargs)
        exact.bounded_search = step
        try:
            with counting() as c:
                exact.fit_pixels(pixels, count_form("miou", 6), max_sweeps=3)
        finally:
            exact.bounded_search = original
        per_step.append(c["n"] / len(steps))
    assert max(per_step) <= 6, per_step


@pytest.mark.parametrize("m", [5_000, 40_000])
def test_each_streaming_batch_reads_a_fixed_number_of_times(m):
    logits, labels = biased(m)
    hist = ThresholdHistogram(torch.zeros(6, dtype=torch.float64), bins=64, span=4.0)
    with counting() as c:
        hist.update(logits, labels)
    # Input checks (finite logits, label range) and the chunk loop's size: none per pixel or class.
    assert c["n"] <= 8, c["n"]
