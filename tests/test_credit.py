"""Exact per-pixel credit (segreward.credit) and the local-expectation estimator.

The references are independent of the credit code: the credit table is compared with a brute
-force recomputation of the reward (segreward.rewards, itself tested against torchmetrics) for
every pixel and class, and the estimator's expected gradient with the exact gradient of E[R]
obtained by enumerating every segmentation of a tiny batch.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from segreward import rewards as R
from segreward.credit import count_form, counts, credit_table, reward_from_counts
from segreward.errors import SegrewardError
from segreward.reinforce import ReinforceLoss, local_surrogate

IGN = 255
C = 5
WEIGHTS = [0.5, 2.0, 1.0, 3.0, 0.25]


def _np_score(spec, pred, target):
    """Independent float64 reference (numpy, one class at a time; MMSegmentation's definitions:
    classes present in prediction or label, ignored pixels excluded) for one image."""
    valid = target != IGN
    p, t = pred[valid], target[valid]
    if isinstance(spec, dict):
        return sum(w * _np_score(n, pred, target) for n, w in spec.items()) / sum(spec.values())
    if spec == "pixel_accuracy":
        return float((p == t).sum()) / t.size if t.size else 0.0
    num = den = 0.0
    for c in range(C):
        inter = float(((p == c) & (t == c)).sum())
        area_p, area_t = float((p == c).sum()), float((t == c).sum())
        if spec == "dice":
            if area_p + area_t > 0:
                num, den = num + 2 * inter / (area_p + area_t), den + 1
            continue
        union = area_p + area_t - inter
        if union > 0:
            w = WEIGHTS[c] if spec == "weighted_miou" else 1.0
            num, den = num + w * inter / union, den + w
    return num / den if den > 0 else 0.0


def _reference(spec):
    """A float64 reward fn(pred [N,H,W], target [N,H,W]) -> [N] that shares no code with segreward."""
    def fn(pred, target):
        return torch.tensor([_np_score(spec, p.numpy(), t.numpy()) for p, t in zip(pred, target)], dtype=torch.float64)
    return fn


def _fixture(seed=0, b=3, h=4, w=5):
    """Labels use classes 0-2 only (3 and 4 absent), with ignored pixels; the sample has a class
    that appears once (it leaves the present set when that pixel moves) and misses others."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGN
    sample = torch.randint(0, 3, (b, h, w), generator=g)
    sample[0, 0, 0] = 3  # class 3: one pixel in image 0, in no label
    sample[1] = torch.where(sample[1] == 2, torch.zeros_like(sample[1]), sample[1])  # class 2 unpredicted in image 1
    return sample, target


SPECS = ["miou", "weighted_miou", "dice", "pixel_accuracy", {"miou": 1.0, "pixel_accuracy": 0.5}]


def _brute_force(spec, sample, target, scope, extra=None):
    """credit[b, c, h, w] by recomputing the reward with one pixel changed (float64)."""
    ref = _reference(spec)
    b, h, w = sample.shape

    def score(s):
        if scope == "image":
            return ref(s, target)
        # batch (and running: extra images stand in for earlier batches): one tall image
        ps, ts = [s], [target]
        if extra is not None:
            ps.append(extra[0])
            ts.append(extra[1])
        p = torch.cat(ps).reshape(1, -1, w)
        t = torch.cat(ts).reshape(1, -1, w)
        return ref(p, t).expand(b)

    base = score(sample)
    out = torch.zeros(b, C, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if target[i, y, x] == IGN:
                    continue
                for c in range(C):
                    s = sample.clone()
                    s[i, y, x] = c
                    out[i, c, y, x] = score(s)[i] - base[i]
    return out


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("scope", ["image", "batch", "running"])
def test_credit_table_equals_brute_force(spec, scope):
    sample, target = _fixture()
    form = count_form(spec, C, WEIGHTS)
    cnt = counts(sample, target, C, IGN).double()  # [B, C, 3]
    extra = None
    if scope == "image":
        group_counts = cnt
    else:
        group_counts = cnt.sum(0, keepdim=True)
        if scope == "running":  # earlier batches' counts: two more labelled images
            extra = _fixture(seed=1, b=2)
            group_counts = group_counts + counts(*extra, C, IGN).double().sum(0, keepdim=True)
    got = credit_table(form, sample, target, group_counts, ignore_index=IGN, dtype=torch.float64)
    want = _brute_force(spec, sample, target, scope, extra)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert bool((want != 0).any())  # the fixture exercises non-trivial credit


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_reward_from_counts_matches_the_reward_functions(spec):
    sample, target = _fixture(seed=3)
    cnt = counts(sample, target, C, IGN).double()
    got = reward_from_counts(count_form(spec, C, WEIGHTS), cnt[..., 0], cnt[..., 1], cnt[..., 2])
    torch.testing.assert_close(got, _reference(spec)(sample, target), rtol=0, atol=1e-12)
    # and the float32 reward functions of segreward.rewards agree with both
    fns = {"miou": lambda p, t: R.miou(p, t, C, IGN), "dice": lambda p, t: R.dice(p, t, C, IGN),
           "weighted_miou": lambda p, t: R.weighted_miou(p, t, C, WEIGHTS, IGN),
           "pixel_accuracy": lambda p, t: R.pixel_accuracy(p, t, IGN)}
    fn = R.get_reward({k: v for k, v in spec.items()}, C, IGN) if isinstance(spec, dict) else fns[spec]
    torch.testing.assert_close(fn(sample, target).double(), got, rtol=0, atol=1e-6)


def test_user_callable_has_no_counts_form():
    with pytest.raises(SegrewardError, match="has no counts form.*miou, weighted_miou, dice, pixel_accuracy"):
        ReinforceLoss(C, reward=lambda p, t: (p == t).float().flatten(1).mean(1), estimator="local")
    # the built-in functions passed as callables are recognised
    assert ReinforceLoss(C, reward=R.dice, estimator="local").form.name == "dice"


def _enumerate(probs, fn):
    """sum over all segmentations y of p(y) * fn(y) for probs [B, C, H, W] (tiny)."""
    b, c, h, w = probs.shape
    total = 0
    for flat in itertools.product(range(c), repeat=b * h * w):
        y = torch.tensor(flat).view(b, h, w)
        p = probs.gather(1, y.unsqueeze(1)).prod()
        total = total + p * fn(y)
    return total


@pytest.mark.parametrize("scope", ["image", "batch", "running"])
@pytest.mark.parametrize("spec", ["miou", "dice"])
def test_expected_local_gradient_equals_exact_gradient(scope, spec):
    """E_y[grad surrogate(y)] == grad E_y[R(y)], summing over all 3^4 segmentations of a 2-image batch."""
    torch.manual_seed(0)
    c, b, h, w = 3, 2, 1, 2
    logits = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 2]], [[1, IGN]]])
    form = count_form(spec, c)
    running = torch.tensor([[[3.0, 5.0, 4.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]], dtype=torch.float64)

    def group_counts(y):
        cnt = counts(y, target, c, IGN).double()
        if scope == "image":
            return cnt
        cnt = cnt.sum(0, keepdim=True)
        return cnt + running if scope == "running" else cnt

    def objective(y):  # mean over images (image scope) or the batch's reward
        cnt = group_counts(y)
        return reward_from_counts(form, cnt[..., 0], cnt[..., 1], cnt[..., 2]).mean()

    probs = F.softmax(logits, dim=1)
    exact = torch.autograd.grad(_enumerate(probs, objective), logits)[0]

    def estimator_grad(y):
        per_group, _ = local_surrogate(logits, y.unsqueeze(0), target, form,
                                       group_counts(y).unsqueeze(0), IGN)
        loss = per_group.mean() if scope == "image" else per_group.sum()
        return -torch.autograd.grad(loss, logits)[0]

    expected = _enumerate(probs.detach(), estimator_grad)
    torch.testing.assert_close(expected, exact, rtol=0, atol=1e-9)
    assert float(exact.abs().max()) > 1e-3


@pytest.mark.parametrize("scope", ["image", "batch", "running"])
def test_local_loss_module_runs_and_logs_credit_diagnostics(scope):
    torch.manual_seed(0)
    logits = torch.randn(2, C, 8, 8, requires_grad=True)
    target = torch.randint(0, C, (2, 8, 8))
    target[:, :2] = IGN
    loss_fn = ReinforceLoss(C, estimator="local", scope=scope, ignore_index=IGN)
    assert loss_fn.k == 1
    loss = loss_fn(logits, target)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    assert float(logits.grad[:, :, :2].abs().sum()) == 0  # ignored pixels get no gradient
    d = loss_fn.diagnostics
    assert set(d) >= {"reward_mean", "greedy_reward", "credit_abs", "credit_label_pos", "entropy"}
    assert 0 < d["credit_label_pos"] <= 1 and d["credit_abs"] > 0
    if scope == "running":
        assert float(loss_fn.running_counts.sum()) > 0
        state = loss_fn.state_dict()
        assert "running_counts" in state
        fresh = ReinforceLoss(C, estimator="local", scope=scope, ignore_index=IGN)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.running_counts, loss_fn.running_counts)
        fresh.reset_running()
        assert float(fresh.running_counts.sum()) == 0


def test_running_counts_are_discounted_sums_of_sample_counts():
    torch.manual_seed(0)
    logits = torch.full((1, C, 4, 4), -30.0)
    logits[:, 1] = 30.0  # the policy is (numerically) certain: every sample is all class 1
    target = torch.ones(1, 4, 4, dtype=torch.long)
    loss_fn = ReinforceLoss(C, estimator="local", scope="running", momentum=0.5)
    for _ in range(3):
        loss_fn(logits, target)
    # batch counts of class 1: I = P = L = 16; running = 0.5 * (running + batch), three times
    torch.testing.assert_close(loss_fn.running_counts[1], torch.full((3,), 16 * (0.5 + 0.25 + 0.125), dtype=torch.float64))


def test_sample_estimator_batch_scope_is_one_reward_per_sample():
    torch.manual_seed(0)
    logits = torch.randn(3, C, 6, 6, requires_grad=True)
    target = torch.randint(0, C, (3, 6, 6))
    loss_fn = ReinforceLoss(C, scope="batch", k=4)
    loss_fn(logits, target).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # a user's callable at batch scope: the batch is scored as one tall image
    own = ReinforceLoss(C, reward=lambda p, t: R.miou(p, t, C), scope="batch", k=2, baseline="loo")
    torch.manual_seed(1)
    own(logits.detach(), target)
    assert 0 <= own.diagnostics["reward_mean"] <= 1
    with pytest.raises(SegrewardError, match="no counts form"):
        ReinforceLoss(C, reward=lambda p, t: R.miou(p, t, C), scope="running")


def test_sample_estimator_running_scope_scores_batch_plus_running_counts():
    torch.manual_seed(0)
    logits = torch.randn(2, C, 6, 6, requires_grad=True)
    target = torch.randint(0, C, (2, 6, 6))
    loss_fn = ReinforceLoss(C, scope="running", k=2, momentum=0.5)
    loss_fn(logits, target).backward()
    first = loss_fn.running_counts.clone()
    assert float(first.sum()) > 0 and float(logits.grad.abs().sum()) > 0
    # the running counts are the discounted mean of the K samples' counts: labels fix L exactly
    label_area = torch.bincount(target.flatten(), minlength=C).double()
    torch.testing.assert_close(first[:, 2], 0.5 * label_area)
    loss_fn.eval()  # outside training the counts are read but not updated
    loss_fn(logits, target)
    torch.testing.assert_close(loss_fn.running_counts, first)


def test_draw_from_probs_argmax_is_the_first_maximum_and_samples_follow_the_cdf():
    from segreward.sampling import draw_from_probs

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, 5, 7) * 3, dim=1)
    p[0, :, 0, 0] = torch.tensor([0.1, 0.3, 0.3, 0.1, 0.1, 0.1])  # a tie: the first maximum wins
    samples, arg = draw_from_probs(p, 3, torch.Generator().manual_seed(1), with_argmax=True)
    assert torch.equal(arg, p.argmax(1)) and int(arg[0, 0, 0]) == 1
    # the same uniforms through searchsorted on the CDF give the same classes
    u = torch.rand(2, 5, 7, 3, generator=torch.Generator().manual_seed(1))
    cdf = torch.cumsum(p.permute(0, 2, 3, 1), -1).contiguous()
    ref = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=5).permute(3, 0, 1, 2)
    assert torch.equal(samples, ref)
