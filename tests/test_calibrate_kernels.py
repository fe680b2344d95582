"""The exact fit's fused CPU loops (numba) give the same offsets, rewards and histories, bit for
bit, as the tensor code they replace; SEGREWARD_NUMBA=0 turns them off."""

import os
import subprocess
import sys

import pytest
import torch

from segreward import _numba
from segreward.calibrate import _kernels
from segreward.calibrate.exact import fit_pixels, pixel_set, set_confusion
from segreward.calibrate.fit import fit_offsets
from segreward.calibrate.search import check_count_form

pytestmark = pytest.mark.skipif(not _numba.available(), reason="numba not installed")


def both(monkeypatch, *args, **kwargs):
    """fit_offsets with the fused loops, then with the tensor code."""
    fused = fit_offsets(*args, **kwargs)
    monkeypatch.setattr(_numba, "available", lambda: False)
    plain = fit_offsets(*args, **kwargs)
    monkeypatch.undo()
    return fused, plain


def scenes(seed, n=6, c=7, h=40, w=50, scale=1.0, ties=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, h, w, generator=g) * scale
    y = torch.randint(0, c, (n, h, w), generator=g)
    # labels that follow the logits in part, so the fit has something to trade
    y = torch.where(torch.rand(n, h, w, generator=g) < 0.5, z.argmax(1), y)
    y[:, :3] = 255
    if ties:  # rounded logits: equal scores, equal thresholds, ties between classes
        z[:, :, ::3] = (z[:, :, ::3] * 2).round() / 2
    return z.to(dtype), y


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reward", ["miou", "dice", "pixel_accuracy", {"miou": 1.0, "pixel_accuracy": 0.5}])
def test_fused_equals_tensor_code(monkeypatch, seed, reward):
    z, y = scenes(seed, scale=1 + seed)
    fused, plain = both(monkeypatch, z, y, reward=reward)
    assert fused.offsets.tolist() == plain.offsets.tolist()
    assert fused.history == plain.history and fused.sweeps == plain.sweeps
    assert fused.reward_before == plain.reward_before and fused.reward_after == plain.reward_after


@pytest.mark.parametrize("case", ["bound", "weighted", "float64", "init", "two_classes", "no_ties"])
def test_fused_equals_tensor_code_in_every_setting(monkeypatch, case):
    kw, z, y = {}, *scenes(11)
    if case == "bound":
        kw["bound"] = 0.3
    elif case == "weighted":
        kw = {"reward": "weighted_miou", "class_weights": torch.linspace(0.2, 2.0, 7)}
    elif case == "float64":  # logits float32 cannot hold: the fit reads float64
        z, y = scenes(12, dtype=torch.float64)
        z = z + 1e-9 * torch.rand_like(z)
    elif case == "init":
        kw["init"] = torch.linspace(-0.5, 0.5, 7)
    elif case == "two_classes":
        z, y = scenes(13, c=2)
    elif case == "no_ties":
        z, y = scenes(14, ties=False)
    fused, plain = both(monkeypatch, z, y, **kw)
    assert fused.offsets.tolist() == plain.offsets.tolist() and fused.history == plain.history
    assert fused.scores_before == plain.scores_before and fused.scores_after == plain.scores_after


def test_before_comes_from_the_fit_and_matches_a_separate_evaluation():
    z, y = scenes(3)
    pixels = pixel_set(z, y)
    start = {}
    fit_pixels(pixels, check_count_form("miou", 7), start=start)
    assert torch.equal(start["confusion"], set_confusion(pixels, torch.zeros(7, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_set_confusion_loop_equals_tensor_code(monkeypatch, dtype):
    """The fused argmax + confusion (first maximum on ties) against argmax_major + bincount, with
    tied logits and offsets that make more ties."""
    z, y = scenes(5, dtype=dtype)
    pixels = pixel_set(z, y)
    for b in (torch.zeros(7, dtype=torch.float64), torch.linspace(-1, 1, 7, dtype=torch.float64),
              torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 0.5], dtype=torch.float64)):
        fused = set_confusion(pixels, b)
        monkeypatch.setattr(_numba, "available", lambda: False)
        plain = set_confusion(pixels, b)
        monkeypatch.undo()
        assert torch.equal(fused, plain) and fused.sum() == (y != 255).sum()


def test_switch_off_by_environment():
    code = "from segreward import _numba; print(_numba.available())"
    env = {**os.environ, "SEGREWARD_NUMBA": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _top2_state(seed, m=5000, c=6):
    g = torch.Generator().manual_seed(seed)
    zc = torch.randn(c, m, generator=g)
    zc[:, ::7] = (zc[:, ::7] * 2).round() / 2  # tied scores
    b = torch.randn(c, dtype=torch.float64, generator=g)
    v1, i1, v2, i2 = _full_top2(zc, b)
    t = torch.randint(0, c, (m,), generator=g, dtype=torch.int32)
    return zc, b, v1, i1, v2, i2, t


def _full_top2(zc, b):
    s = zc.double() + b.unsqueeze(1)
    v1, i1 = s.max(0)
    v2, i2 = s.scatter(0, i1.unsqueeze(0), -float("inf")).max(0)
    return v1, i1.int(), v2, i2.int()


def test_prefix_and_bins_match_their_tensor_definitions():
    """The per-pixel loops of a step against the tensor expressions they fuse: thresholds and
    codes, bins, histogram, extremes per bin, and the counts at every bin edge."""
    zc, b, v1, i1, v2, i2, t = _top2_state(5)
    m, c, k, nb = zc.shape[1], zc.shape[0], 2, 40
    code, tau = torch.empty(m, dtype=torch.int32), torch.empty(m, dtype=torch.float64)
    lo, hi = _kernels.prefix(i1.numpy(), i2.numpy(), v1.numpy(), v2.numpy(), zc[k].numpy(), t.numpy(), k,
                             tau.numpy(), code.numpy())
    src = torch.where(i1 == k, i2, i1)
    assert torch.equal(tau, torch.where(i1 == k, v2, v1) - zc[k])
    assert torch.equal(code, src * 3 + (t == src).int() + 2 * (t == k).int())
    assert (lo, hi) == (float(tau.min()), float(tau.max()))
    idx = torch.empty(m, dtype=torch.int16)
    hist = torch.empty(nb * c * 3, dtype=torch.int32)
    t_max, t_min = torch.empty(nb, dtype=torch.float64), torch.empty(nb, dtype=torch.float64)
    _kernels.bins(tau.numpy(), code.numpy(), lo, (hi - lo) / nb, nb, c, idx.numpy(), hist.numpy(), t_max.numpy(),
                  t_min.numpy())
    want = ((tau - lo) / ((hi - lo) / nb)).long().clamp(max=nb - 1)
    assert torch.equal(idx.long(), want)
    h = torch.bincount(want * 3 * c + code, minlength=nb * c * 3)
    assert torch.equal(hist.long(), h)
    ref_max = torch.full((nb,), -float("inf"), dtype=torch.float64).scatter_reduce(0, want, tau, "amax")
    ref_min = torch.full((nb,), float("inf"), dtype=torch.float64).scatter_reduce(0, want, tau, "amin")
    assert torch.equal(t_max, ref_max) and torch.equal(t_min, ref_min)
    # edge e: the pixels of bins < e have moved from their source class into k
    p_e, i_e = torch.empty(nb + 1, c, dtype=torch.float64), torch.empty(nb + 1, c, dtype=torch.float64)
    size = torch.empty(nb, dtype=torch.long)
    _kernels.edges(hist.numpy(), c, k, p_e.numpy(), i_e.numpy(), size.numpy())
    assert torch.equal(size, torch.bincount(want, minlength=nb))
    state = code % 3
    for e in (0, 1, nb // 2, nb):
        stay, moved = want >= e, want < e
        p_ref = torch.bincount(src[stay].long(), minlength=c).double()
        i_ref = torch.bincount(src[stay & (state == 1)].long(), minlength=c).double()
        p_ref[k], i_ref[k] = float(moved.sum()), float((moved & (state == 2)).sum())
        assert torch.equal(p_e[e], p_ref) and torch.equal(i_e[e], i_ref), e


def test_gather_and_moves_match_a_sort_and_a_replay():
    """The pixels of some bins in threshold order (a stable sort), and each move's counts against
    a replay of the moves one by one."""
    from segreward.calibrate.search import SearchWork, _move_counts, _running

    zc, b, v1, i1, v2, i2, t = _top2_state(6, m=3000, c=5)
    m, c, k, nb = zc.shape[1], zc.shape[0], 1, 30
    code, tau = torch.empty(m, dtype=torch.int32), torch.empty(m, dtype=torch.float64)
    lo, hi = _kernels.prefix(i1.numpy(), i2.numpy(), v1.numpy(), v2.numpy(), zc[k].numpy(), t.numpy(), k,
                             tau.numpy(), code.numpy())
    work = SearchWork(m, fused=True)
    idx, _, _, p_e, i_e, size = work.fused_bins(tau, code, lo, (hi - lo) / nb, nb, c, k)
    bins = torch.tensor([0, 3, 4, 17, nb - 1])
    t_s, code_s, seg, starts = work.fused_gather(idx, tau, code, bins, size, nb)
    sel = torch.nonzero(torch.isin(idx.long(), bins)).flatten()
    sel = sel[torch.argsort(tau[sel], stable=True)]
    assert torch.equal(t_s, tau[sel]) and torch.equal(code_s, code[sel])
    assert torch.equal(seg, torch.searchsorted(bins, idx[sel].long()))
    i_b, p_b = i_e[bins], p_e[bins]
    fused = work.fused_moves(code_s, starts, k, i_b, p_b)
    sizes = starts[1:] - starts[:-1]
    plain = _move_counts(t_s, code_s.long(), seg, k, c, i_b, p_b, sizes, starts[:-1])
    for a, want in zip(fused, plain):
        assert torch.equal(a, want.to(a.dtype))
    # replay: each segment from its base counts, one move at a time
    src, i_src, p_src, hit, i_c, p_c = fused
    for g in range(bins.numel()):
        ci, cp = i_b[g].clone(), p_b[g].clone()
        for j in range(int(starts[g]), int(starts[g + 1])):
            s, st = int(code_s[j]) // 3, int(code_s[j]) % 3
            ci[s] -= float(st == 1)
            cp[s] -= 1
            ci[k] += float(st == 2)
            cp[k] += 1
            assert (int(src[j]), float(i_src[j]), float(p_src[j]), float(hit[j])) == (s, float(ci[s]), float(cp[s]),
                                                                                       float(st == 1))
            assert (float(i_c[j]), float(p_c[j])) == (float(ci[k]), float(cp[k]))
    assert torch.equal(_running(torch.ones(int(starts[-1]), dtype=torch.float64), sizes, starts[:-1]),
                       torch.cat([torch.arange(1, int(n) + 1, dtype=torch.float64) for n in sizes]))
    # the moves' rewards: the mIoU loop (fused counts) bit-equal to the tensor code, every reward
    # form through the shared code path equal whichever counts it is given
    from segreward.calibrate.search import _after_moves
    lab = torch.bincount(t.long(), minlength=c).to(torch.float64)
    for reward in ("miou", "dice", {"miou": 1.0, "pixel_accuracy": 0.5}):
        form = check_count_form(reward, c)
        looped = _after_moves(form, t_s, code_s, seg, k, lab, i_b, p_b, starts, fused)
        tensor = _after_moves(form, t_s, code_s.long(), seg, k, lab, i_b, p_b)
        assert torch.equal(looped, tensor), reward


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rising", [True, False])
def test_rise_and_fall_keep_the_top_two(seed, rising):
    """After one offset moves up or down, the kept top two equal a full recomputation (first
    maximum on ties), also for offsets that land exactly on a tie."""
    zc, b, v1, i1, v2, i2, _ = _top2_state(seed)
    k = seed % zc.shape[0]
    for value in (b[k] + (0.7 if rising else -0.7), b[k] + (0.5 if rising else -0.5) * 2):
        old = float(b[k])
        if (value > old) != rising:
            continue
        b[k] = value
        arrays = [a.numpy() for a in (v1, i1, v2, i2)]
        if rising:
            _kernels.rise(zc[k].numpy(), float(value), k, *arrays)
        else:
            _kernels.fall(zc.numpy(), b.numpy(), float(value), k, *arrays)
        w1, j1, w2, j2 = _full_top2(zc, b)
        assert torch.equal(v1, w1) and torch.equal(i1, j1) and torch.equal(v2, w2) and torch.equal(i2, j2)


@pytest.mark.parametrize("classes", [2, 5, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_streaming_pass_equals_tensor_pass(monkeypatch, classes, dtype):
    """A streaming pass's histogram and confusion by the fused loop and by the tensor code, over
    batches of several images and one, with ignored pixels and tied logits."""
    from segreward.calibrate.stream import ThresholdHistogram
    g = torch.Generator().manual_seed(classes)
    z = (torch.randn(3, classes, 30, 41, generator=g) * 2).to(dtype)
    z[:, :, :3] = z[:, :, :3].round()
    y = torch.randint(0, classes, (3, 30, 41), generator=g)
    y[:, :2] = 255
    b = torch.randn(classes, generator=g, dtype=torch.float64) * 0.3

    def one_pass():
        h = ThresholdHistogram(b, 64, 2.0)
        h.update(z, y)
        h.update(z[:1], y[:1])
        return h.hist.clone(), h.confusion.clone()

    fused = one_pass()
    monkeypatch.setattr(_numba, "available", lambda: False)
    plain = one_pass()
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    assert int(fused[1].sum()) == int((y != 255).sum()) * 4 // 3  # every labelled pixel once (3 + 1 images)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 11, 16, 19, 33, 64, 150, 257, 1000, 4103])
def test_row_sum_replays_torch_sum(length):
    """The class sums of the fused search (``_search_kernel.row_sum``) equal torch's ``sum(-1)``
    bit for bit, on rows other than the ones ``sum_lanes`` chose the width on; a left-to-right
    sum does not (the reason for replaying torch's order)."""
    from segreward.calibrate._search_kernel import row_sum, sum_lanes
    lanes = sum_lanes(length)
    if not lanes:
        pytest.skip(f"no vector width replays torch's sum of {length} values on this machine (the tensor code runs)")
    g = torch.Generator().manual_seed(1000 + length)
    x = torch.rand(200, length, generator=g, dtype=torch.float64) * torch.exp(
        3 * torch.randn(200, length, generator=g, dtype=torch.float64))
    x[::5, ::2] = 0.0  # absent classes: zero terms
    acc = torch.empty(16 * lanes, dtype=torch.float64).numpy()
    got = torch.tensor([row_sum(row, lanes, acc) for row in x.numpy()], dtype=torch.float64)
    assert torch.equal(got, x.sum(-1))
    if length >= 5:
        assert not torch.equal(x.cumsum(-1)[:, -1], x.sum(-1))


@pytest.mark.parametrize("lanes", ["found", "none"])
def test_plain_miou_search_in_one_loop_equals_tensor_code(monkeypatch, lanes):
    """The plain mIoU's steps run through ``_search_kernel.miou_search`` (counted), with the same
    offsets, history and rewards as the tensor code; where no width replays torch's sum the fused
    path keeps the per-op search, with the same numbers."""
    from segreward.calibrate import _search_kernel
    if lanes == "none":
        monkeypatch.setattr(_search_kernel, "sum_lanes", lambda length: 0)
    calls, search = [], _search_kernel.miou_search
    monkeypatch.setattr(_search_kernel, "miou_search", lambda *a: calls.append(1) or search(*a))
    z, y = scenes(21, scale=2.0)
    for kw in ({}, {"bound": 0.4}, {"init": torch.linspace(-1.0, 1.0, 7)}):
        calls.clear()
        fused = fit_offsets(z, y, reward="miou", **kw)
        assert (len(calls) > 0) == (lanes == "found")
        with monkeypatch.context() as m:
            m.setattr(_numba, "available", lambda: False)
            plain = fit_offsets(z, y, reward="miou", **kw)
        assert fused.offsets.tolist() == plain.offsets.tolist() and fused.history == plain.history, kw
        assert fused.reward_after == plain.reward_after and fused.scores_after == plain.scores_after
