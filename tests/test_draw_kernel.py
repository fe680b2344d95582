"""The sampled estimator's fused pass (numba, :func:`segreward._draw_kernel.draw_scored` and
``draw_grad``) against the tensor code: the same samples, counts, greedy prediction and rewards
(integers, so equal), the same loss and gradient up to float summation order, in every scope,
baseline, temperature and with tied or -inf logits."""

import pytest
import torch

from segreward import _numba
from segreward.metrics import sample_confusion
from segreward.reinforce import ReinforceLoss, _draw_counted, _entropy
from segreward.sampling import CategoricalSampler, _policy, draw_from_probs, first_argmax

pytestmark = pytest.mark.skipif(not _numba.available(), reason="numba not installed")


def _inputs(seed, b=3, c=6, h=9, w=13, case=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, h, w, generator=g) * 2
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[:, :2] = 255
    if case == "ties":  # equal logits: first maximum, equal probabilities
        z[:, :, 2:5] = z[:, :, 2:5].round()
        z[:, 1, 5] = z[:, 0, 5]
    elif case == "masked_class":  # p = 0: never drawn, no NaN in the entropy
        z[:, 2] = -float("inf")
    return z, y


def _step(monkeypatch, fused, z, y, steps=2, **kw):
    if not fused:
        monkeypatch.setattr(_numba, "available", lambda: False)
    loss = ReinforceLoss(z.shape[1], **{"estimator": "sample", **kw})
    torch.manual_seed(5)  # the sampler draws from the global generator
    out = []
    for i in range(steps):
        zz = (z + i).clone().requires_grad_()
        value = loss(zz, y)
        value.backward()
        out.append((value.item(), zz.grad, dict(loss.diagnostics)))
    monkeypatch.undo()
    return out, {k: v.clone() for k, v in loss.state_dict().items()}


@pytest.mark.parametrize("kw", [
    dict(k=4), dict(k=3, scope="batch", baseline="greedy", temperature=0.7),
    dict(k=2, scope="running", baseline="ema", momentum=0.5), dict(k=4, reward="dice", ce_weight=0.3),
    dict(k=1, baseline="greedy", normalize=True), dict(k=4, reward={"miou": 1.0, "pixel_accuracy": 0.5}),
], ids=["loo", "batch_greedy_T", "running_ema", "dice_ce", "k1_norm", "mixed"])
@pytest.mark.parametrize("case", [None, "ties", "masked_class"])
def test_fused_sample_estimator_equals_tensor_code(monkeypatch, kw, case):
    z, y = _inputs(1, case=case)
    fused, fused_state = _step(monkeypatch, True, z, y, **kw)
    plain, plain_state = _step(monkeypatch, False, z, y, **kw)
    for (v1, g1, d1), (v2, g2, d2) in zip(fused, plain):
        assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-9)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
        assert torch.isfinite(g1).all()
        assert d1.keys() == d2.keys()
        # the rewards come from equal integer counts: equal; the entropy differs in summation order
        for key in ("reward_mean", "reward_std", "adv_std", "greedy_reward"):
            assert d1[key] == d2[key], key
        assert d1["entropy"] == pytest.approx(d2["entropy"], rel=1e-6)
    for key in fused_state:
        assert torch.equal(fused_state[key].nan_to_num(-1), plain_state[key].nan_to_num(-1)), key


@pytest.mark.parametrize("case", [None, "ties", "masked_class"])
@pytest.mark.parametrize("k", [1, 4])
def test_draw_counted_against_its_definitions(case, k):
    """Every output of the fused pass against the tensor function it replaces."""
    z, y = _inputs(2, case=case)
    logp = _policy(z, 1.0)
    p = logp.exp()
    loss = ReinforceLoss(z.shape[1], estimator="sample", k=k, baseline="greedy",
                         sampler=CategoricalSampler(generator=torch.Generator().manual_seed(9)))
    samples, confusion, greedy, entropy, log_prob = _draw_counted(loss, p, z, y, logp=logp)
    want = draw_from_probs(p, k, torch.Generator().manual_seed(9))[0]
    mask = y != 255
    assert samples.dtype == torch.uint8 and torch.equal(samples.long(), want)
    assert torch.equal(confusion, sample_confusion(want, y, z.shape[1]))
    assert torch.equal(greedy, sample_confusion(first_argmax(z).unsqueeze(0), y, z.shape[1]))
    lp = logp.gather(1, want.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    torch.testing.assert_close(log_prob, (lp * mask).flatten(2).sum(-1).double(), rtol=1e-6, atol=1e-6)
    assert entropy.item() == pytest.approx((_entropy(p, logp, mask) * mask.sum()).item(), rel=1e-6)
    # the local estimator's form of the entropy: lse - sum p z
    lse = torch.logsumexp(z, 1)
    entropy_lse = _draw_counted(loss, p, z, y, lse=lse)[3]
    assert entropy_lse.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_fused_gradient_is_the_score_function():
    """d/dz sum_k g_k log_prob_k by the backward loop against autograd through log_softmax and
    gather, at temperature 0.5."""
    z, y = _inputs(3)
    loss = ReinforceLoss(z.shape[1], estimator="sample", k=3, temperature=0.5,
                         sampler=CategoricalSampler(0.5, generator=torch.Generator().manual_seed(4)))
    from segreward.reinforce import _draw_scored
    zz = z.clone().requires_grad_()
    log_prob, *_ = _draw_scored(loss, zz, y)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0], [2.0, 1.0, 1.0]])
    (weights * log_prob).sum().backward()
    ref = z.clone().requires_grad_()
    logp = torch.log_softmax(ref / 0.5, 1)
    samples = draw_from_probs(logp.detach().exp(), 3, torch.Generator().manual_seed(4))[0]
    lp = (logp.gather(1, samples.permute(1, 0, 2, 3)).permute(1, 0, 2, 3) * (y != 255)).flatten(2).sum(-1)
    (weights * lp).sum().backward()
    torch.testing.assert_close(log_prob.detach(), lp.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(zz.grad, ref.grad, rtol=1e-5, atol=1e-6)  # float32 cancellation


@pytest.mark.parametrize("estimator", ["sample", "local"])
def test_fused_estimators_beyond_256_classes(monkeypatch, estimator):
    """More classes than a byte holds: the fused draws keep every class id (int32 samples), so
    losses, gradients and rewards equal the tensor code's."""
    z, y = _inputs(4, b=2, c=300, h=6, w=7)
    # labels among the classes past 255 and logits that mostly agree with them: the rewards are
    # far from 0, and most samples are class ids a byte cannot hold
    g = torch.Generator().manual_seed(5)
    y = torch.where(y == 255, y, torch.randint(250, 300, y.shape, generator=g))
    z = z.scatter_add(1, y.clamp(max=299).unsqueeze(1), torch.full((2, 1, 6, 7), 6.0))
    (fused, _), (plain, _) = (_step(monkeypatch, f, z, y, steps=1, k=2, estimator=estimator) for f in (True, False))
    (v1, g1, d1), (v2, g2, d2) = fused[0], plain[0]
    if estimator == "local":  # the local estimator's fused loops are bit-equal
        assert v1 == v2 and torch.equal(g1, g2)
    else:
        assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-9)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
    assert d1["reward_mean"] == d2["reward_mean"] and d1["reward_mean"] > 0.1
