"""The estimators' fused loops (numba): the local credit gives the same loss and gradient, bit
for bit, as the tensor code (credit_table), and the same diagnostics up to summation order, in
every reward form, scope, K and dtype; the categorical draws are the same samples."""

import pytest
import torch

from segreward import _numba
from segreward.credit import count_form, credit_table
from segreward.reinforce import ReinforceLoss, _fused_credit

pytestmark = pytest.mark.skipif(not _numba.available(), reason="numba not installed")


def step(monkeypatch, fused, z, y, **kw):
    if not fused:
        monkeypatch.setattr(_numba, "available", lambda: False)
    loss = ReinforceLoss(z.shape[1], estimator="local", **kw)
    torch.manual_seed(7)
    zz = z.clone().requires_grad_()
    value = loss(zz, y)
    value.backward()
    monkeypatch.undo()
    return value.item(), zz.grad, dict(loss.diagnostics)


@pytest.mark.parametrize("reward", ["miou", "dice", "pixel_accuracy", {"miou": 1.0, "pixel_accuracy": 0.5}])
@pytest.mark.parametrize("scope", ["image", "batch", "running"])
@pytest.mark.parametrize("k", [1, 3])
def test_fused_equals_tensor_code(monkeypatch, reward, scope, k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(3, 6, 12, 16, generator=g) * 2
    y = torch.randint(0, 6, (3, 12, 16), generator=g)
    y[:, :2] = 255
    a = step(monkeypatch, True, z, y, reward=reward, scope=scope, k=k)
    b = step(monkeypatch, False, z, y, reward=reward, scope=scope, k=k)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == pytest.approx(b[2], rel=1e-6)  # diagnostics: sums' order


@pytest.mark.parametrize("case", ["masked_class", "float64", "weighted", "one_class_present"])
def test_fused_equals_tensor_code_at_the_edges(monkeypatch, case):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 10, 12, generator=g)
    y = torch.randint(0, 5, (2, 10, 12), generator=g)
    kw = {}
    if case == "masked_class":  # -inf logits: p = 0, no gradient there
        z[:, 2] = -float("inf")
    elif case == "float64":
        z = z.double()
    elif case == "weighted":
        kw = {"reward": "weighted_miou", "reward_kwargs": {"class_weights": [0.5, 1, 2, 1, 3]}}
    elif case == "one_class_present":
        y[:] = 1
    a = step(monkeypatch, True, z, y, **kw)
    b = step(monkeypatch, False, z, y, **kw)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == pytest.approx(b[2], rel=1e-6)  # diagnostics: sums' order
    assert torch.isfinite(a[1]).all()


def test_credit_matches_the_table_it_fuses():
    """The loop's credit against credit_table itself (one sample), and p * credit."""
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 4, 6, 7
    p = torch.softmax(torch.randn(b, c, h, w, generator=g), 1)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[0, 0] = 255
    s = torch.randint(0, c, (1, b, h, w), generator=g)
    form = count_form("miou", c)
    cm = torch.zeros(1, b, c, 3, dtype=torch.float64)
    for i in range(b):  # per-image counts (I, P, L) of the sample
        v = y[i] != 255
        for k in range(c):
            cm[0, i, k] = torch.tensor([((s[0, i] == k) & (y[i] == k) & v).sum(), ((s[0, i] == k) & v).sum(),
                                        ((y[i] == k) & v).sum()])
    credit, weighted, diag = _fused_credit(form, p, s, y, cm, torch.arange(b), 255)
    want = credit_table(form, s[0], y, cm[0], torch.arange(b), 255, p.dtype)
    assert torch.equal(credit, want) and torch.equal(weighted, p * want)
    # the diagnostics: sum |credit| and the labelled pixels whose label's credit is > 0
    label = want.gather(1, y.clamp(0, c - 1).unsqueeze(1))[:, 0]
    assert diag[0].item() == pytest.approx(want.abs().double().sum().item(), rel=1e-6)
    assert diag[1].item() == ((label > 0) & (y != 255)).sum().item()


@pytest.mark.parametrize("classes", [2, 5, 11, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 4])
def test_fused_draws_equal_tensor_draws(monkeypatch, classes, dtype, k):
    """draw_from_probs's loop (numba) against its tensor code: the same samples and argmax,
    also with tied logits (equal probabilities) and more than 255 classes' worth of counts."""
    from segreward.sampling import draw_from_probs
    g = torch.Generator().manual_seed(classes)
    z = torch.randn(3, classes, 9, 13, generator=g) * 3
    z[:, :, :2] = z[:, :, :2].round()
    p = torch.softmax(z.to(dtype), 1)
    fused = draw_from_probs(p, k, torch.Generator().manual_seed(3), with_argmax=True)
    monkeypatch.setattr(_numba, "available", lambda: False)
    plain = draw_from_probs(p, k, torch.Generator().manual_seed(3), with_argmax=True)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    assert fused[0].dtype == torch.long and fused[0].shape == (k, 3, 9, 13)


def test_draws_accept_probabilities_that_carry_a_gradient():
    """draw_from_probs is public and runs without autograd (its decorator), fused or not."""
    from segreward.sampling import draw_from_probs
    p = torch.softmax(torch.randn(2, 5, 6, 7, requires_grad=True), 1)
    samples, argmax = draw_from_probs(p, 3, torch.Generator().manual_seed(0), with_argmax=True)
    assert samples.shape == (3, 2, 6, 7) and not samples.requires_grad and torch.equal(argmax, p.argmax(1))
