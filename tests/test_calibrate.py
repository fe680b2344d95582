"""Calibration (reward-optimal class offsets) against an independent numpy reference.

The reference scores a segmentation by brute force: argmax of (logits + offsets) in numpy, a
confusion matrix by np.add.at, and the reward's own textbook definition from it -- nothing
shared with segreward.credit or segreward.calibrate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segreward.calibrate import fit_offsets
from segreward.calibrate.exact import pixel_set
from segreward.calibrate.search import reward_curve
from segreward.credit import count_form
from segreward.errors import SegrewardError

IGNORE = 255


def np_reward(pred, target, c, reward, weights=None):
    """Dataset-level reward of flat integer maps, from the definition (numpy, float64)."""
    keep = target != IGNORE
    pred, target = pred[keep], target[keep]
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (target, pred), 1)
    inter = np.diag(cm).astype(float)
    label, predicted = cm.sum(1).astype(float), cm.sum(0).astype(float)
    if reward == "pixel_accuracy":
        return inter.sum() / label.sum()
    if reward == "dice":
        den = predicted + label
        present = den > 0
        return float(np.mean(2 * inter[present] / den[present]))
    union = predicted + label - inter
    present = union > 0
    iou = inter[present] / union[present]
    if reward == "miou":
        return float(iou.mean())
    w = np.asarray(weights)[present]
    return float((w * iou).sum() / w.sum())


def np_argmax(z, b):
    return np.argmax(z + b[None, :], axis=1)  # numpy: first maximum on ties


def random_case(rng, m=60, c=4, ties=False, ignore_frac=0.2, missing_class=True):
    z = rng.normal(size=(m, c))
    if ties:  # coarse logits: many equal thresholds
        z = np.round(z * 2) / 2
    t = rng.integers(0, c, size=m)
    if missing_class:  # a class absent from the labels: it can enter/leave the present set
        t[t == c - 1] = 0
    t[rng.random(m) < ignore_frac] = IGNORE
    return z, t


REWARDS = [("miou", None), ("weighted_miou", [1.0, 3.0, 0.5, 2.0]), ("dice", None), ("pixel_accuracy", None)]


@pytest.mark.parametrize("reward,weights", REWARDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_reward_curve_equals_brute_force_at_every_interval(reward, weights, ties, seed):
    rng = np.random.default_rng(seed)
    c = 4
    z, t = random_case(rng, c=c, ties=ties)
    b = rng.normal(size=c) * 0.5
    if ties:
        b = np.round(b * 2) / 2
    keep = t != IGNORE
    form = count_form(reward, c, weights)
    zt, tt = torch.tensor(z[keep]), torch.tensor(t[keep])
    for k in range(c):
        s = zt + torch.tensor(b)
        s[:, k] = -float("inf")
        src = s.argmax(1)
        tau = s.gather(1, src[:, None])[:, 0] - zt[:, k]
        lo, hi, curve = reward_curve(form, tau, src, tt, k, torch.bincount(tt, minlength=c).double())
        lo, hi = lo.numpy(), hi.numpy()
        assert np.all(hi > lo) and np.all(lo[1:] == hi[:-1])  # exact ties only: intervals tile the line
        # One probe inside every interval (and beyond both ends), scored by brute force.
        probes = np.where(np.isinf(lo), hi - 1.0, np.where(np.isinf(hi), lo + 1.0, (lo + hi) / 2))
        for x, got in zip(probes, curve.numpy()):
            bb = b.copy()
            bb[k] = x
            want = np_reward(np_argmax(z, bb), t, c, reward, weights)
            assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("reward,weights", REWARDS + [({"miou": 1.0, "pixel_accuracy": 0.5}, None)])
@pytest.mark.parametrize("seed", range(3))
def test_fit_never_lowers_the_reward_and_matches_the_reference(reward, weights, seed):
    rng = np.random.default_rng(100 + seed)
    c = 4
    z, t = random_case(rng, m=200, c=c, ties=seed == 2)
    logits = torch.tensor(z, dtype=torch.float32).t().reshape(1, c, 200, 1)
    labels = torch.tensor(t).reshape(1, 200, 1)
    cal = fit_offsets(logits, labels, reward=reward, class_weights=weights, max_sweeps=30)

    def ref(b):
        if isinstance(reward, dict):
            return sum(w * np_reward(np_argmax(z, b), t, c, r) for r, w in reward.items()) / sum(reward.values())
        return np_reward(np_argmax(z, b), t, c, reward, weights)

    assert cal.reward_before == pytest.approx(ref(np.zeros(c)), abs=1e-9)
    assert cal.reward_after == pytest.approx(ref(cal.offsets.numpy()), abs=1e-9)
    assert cal.reward_after >= cal.reward_before - 1e-12
    assert all(b >= a - 1e-12 for a, b in zip(cal.history, cal.history[1:]))
    assert abs(float(cal.offsets.mean())) < 1e-9
    # Coordinate-wise optimal: no single offset on a fine grid does better.
    for k in range(c):
        for x in np.linspace(-6, 6, 121):
            bb = cal.offsets.numpy().copy()
            bb[k] = x
            assert ref(bb) <= cal.reward_after + 1e-9


def test_calibration_raises_miou_of_a_biased_model():
    """A model whose logits are shifted against rare classes: the fit undoes the shift."""
    rng = torch.Generator().manual_seed(0)
    n, c, h, w = 6, 5, 24, 24
    labels = torch.randint(0, c, (n, h, w), generator=rng)
    labels[labels == 4] = torch.randint(0, 2, (int((labels == 4).sum()),), generator=rng)  # class 4 rarer
    logits = 2.0 * torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()
    logits = logits + torch.randn(n, c, h, w, generator=rng)
    logits[:, 3] -= 1.5  # prior shift against class 3
    cal = fit_offsets(logits, labels, max_sweeps=50)
    assert cal.reward_after > cal.reward_before + 0.02
    assert cal.offsets[3] > cal.offsets.mean() + 0.5
    assert cal.scores_after["mIoU"] == pytest.approx(100 * cal.reward_after, abs=1e-6)


def test_bound_limits_offsets():
    rng = np.random.default_rng(3)
    z, t = random_case(rng, m=300, c=4)
    z[:, 1] -= 3.0
    logits = torch.tensor(z).t().reshape(1, 4, 300, 1)
    labels = torch.tensor(t).reshape(1, 300, 1)
    free = fit_offsets(logits, labels, max_sweeps=30)
    bounded = fit_offsets(logits, labels, max_sweeps=30, bound=0.25)
    assert float(free.offsets.max() - free.offsets.min()) > 0.5
    assert float(bounded.offsets.max() - bounded.offsets.min()) <= 0.5 + 1e-9
    assert bounded.reward_after <= free.reward_after + 1e-12


def test_lists_of_images_of_different_sizes():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 4, 4, generator=g)]
    labels = [torch.randint(0, 3, (5, 7), generator=g), torch.randint(0, 3, (4, 4), generator=g)]
    cal = fit_offsets(logits, labels)
    flat_z = torch.cat([z.flatten(1).t() for z in logits]).numpy()
    flat_t = torch.cat([y.flatten() for y in labels]).numpy()
    assert cal.reward_after == pytest.approx(np_reward(np_argmax(flat_z, cal.offsets.numpy()), flat_t, 3, "miou"))


@pytest.mark.parametrize("logits,labels,kw,needle", [
    (torch.randn(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long), {}, "do not match labels"),
    (torch.full((1, 3, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.long), {}, "NaN"),
    (torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), IGNORE), {}, "no labelled pixel"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"reward": "nope"}, "nope"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"reward": lambda p, t: p.float().mean()},
     "no counts form"),
    (torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7), {}, "[7]"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"num_classes": 4}, "num_classes=4"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"bound": -1.0}, "bound"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"max_sweeps": 0}, "max_sweeps"),
    (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), {"init": [0.0, 1.0]}, "2 offsets"),
    (torch.randn(1, 3, 2, 2), torch.tensor([[[0.5, 1.0], [0.0, 0.0]]]), {}, "fractional"),
])
def test_bad_input_is_one_line(logits, labels, kw, needle):
    with pytest.raises(SegrewardError) as e:
        fit_offsets(logits, labels, **kw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_pixel_set_keeps_only_labelled_pixels():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = IGNORE
    ps = pixel_set(logits, labels)
    assert ps.z.shape == (int((labels != IGNORE).sum()), 3)
    assert ps.image.tolist().count(0) == 12 and ps.num_images == 2


@pytest.mark.parametrize("reward,weights", REWARDS + [({"miou": 1.0, "dice": 2.0}, None)])
@pytest.mark.parametrize("seed", range(3))
def test_bounded_search_equals_the_full_curve(reward, weights, seed):
    """The branch-and-bound step (binned edges + bounds, only promising bins sorted) finds the
    same best reward as scoring every interval, also with ties, a bound and a missing class."""
    from segreward.calibrate import search
    rng = np.random.default_rng(200 + seed)
    c, m = 4, 20000
    z, t = random_case(rng, m=m, c=c, ties=seed == 1, ignore_frac=0.0)
    z[:, 2] += 1.0
    zt, tt = torch.tensor(z), torch.tensor(t)
    form = count_form(reward, c, weights)
    label_area = torch.bincount(tt, minlength=c).double()
    for k in range(c):
        for bound in (None, 0.3):
            s = zt.clone()
            s[:, k] = -float("inf")
            src = s.argmax(1)
            tau = s.gather(1, src[:, None])[:, 0] - zt[:, k]
            pred = torch.tensor(np_argmax(z, np.zeros(c)))  # the prediction as it is (first max on ties)
            now = np_reward(pred.numpy(), t, c, reward, weights) if not isinstance(reward, dict) else \
                sum(w * np_reward(pred.numpy(), t, c, r) for r, w in reward.items()) / sum(reward.values())
            full = search.line_search_full(form, tau, src, tt, k, label_area, 0.0, now, bound=bound)
            fast = search.line_search(form, tau, src, tt, k, label_area, 0.0, now, bound=bound)
            assert fast.reward == pytest.approx(full.reward, abs=1e-12)
            # The offset it returns really scores that reward.
            bb = np.zeros(c)
            bb[k] = fast.offset
            got = np_reward(np_argmax(z, bb), t, c, reward, weights) if not isinstance(reward, dict) else \
                sum(w * np_reward(np_argmax(z, bb), t, c, r) for r, w in reward.items()) / sum(reward.values())
            assert got == pytest.approx(fast.reward, abs=1e-12)
            if bound is not None:
                assert abs(fast.offset) <= bound + 1e-12


def test_offsets_survive_float32_folding_of_near_tied_logits():
    """Pixels whose logits differ only by float32 rounding are never split by an offset: the
    reward the fit reports is the reward of float32 logits plus float32 offsets."""
    g = torch.Generator().manual_seed(5)
    n, c, h, w = 4, 3, 16, 16
    labels = torch.randint(0, c, (n, h, w), generator=g)
    # One logit vector per image, copied to every pixel with rounding-sized jitter.
    base = torch.randn(n, c, 1, 1, generator=g).expand(n, c, h, w)
    logits = (base + 1e-7 * torch.randn(n, c, h, w, generator=g)).float()
    cal = fit_offsets(logits, labels, max_sweeps=30)
    pred = (logits + cal.offsets.float().view(1, c, 1, 1)).argmax(1).numpy().reshape(-1)
    assert np_reward(pred, labels.numpy().reshape(-1), c, "miou") == pytest.approx(cal.reward_after, abs=1e-12)


def test_one_class_has_nothing_to_calibrate():
    cal = fit_offsets(torch.randn(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    assert cal.offsets.tolist() == [0.0] and cal.reward_after == cal.reward_before == 1.0
