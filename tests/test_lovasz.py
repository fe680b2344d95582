"""Lovász-softmax against independent numpy references on tiny inputs."""

import numpy as np
import torch

from segreward.lovasz import LovaszSoftmaxLoss, lovasz_softmax


def jaccard_loss_numpy(pred, label, num_classes, ignore=255):
    """Brute force: mean over classes present in the label of 1 - IoU (one pooled set of pixels)."""
    keep = label != ignore
    p, y = pred[keep], label[keep]
    out = []
    for c in range(num_classes):
        if not (y == c).any():
            continue
        inter = np.sum((p == c) & (y == c))
        union = np.sum((p == c) | (y == c))
        out.append(1 - inter / union)
    return float(np.mean(out))


def choquet_numpy(errors, fg):
    """Lovász extension as the Choquet integral  int_0^1 D({i: m_i >= t}) dt  of the Jaccard set loss
    D(M) = |M| / |fg ∪ M|, evaluated exactly over the breakpoints of the piecewise-constant integrand."""
    def D(mask):
        union = np.sum(fg | mask)
        return 0.0 if union == 0 else np.sum(mask) / union
    levels = np.unique(np.concatenate([[0.0], errors]))
    total = 0.0
    for lo, hi in zip(levels[:-1], levels[1:]):
        total += (hi - lo) * D(errors >= hi)
    return total


def test_equals_jaccard_loss_on_one_hot_predictions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = 4
        label = rng.integers(0, c, size=(2, 5, 6))
        label[0, 0, :2] = 255
        pred = rng.integers(0, c, size=(2, 5, 6))
        probs = torch.nn.functional.one_hot(torch.from_numpy(pred), c).permute(0, 3, 1, 2).double()
        got = float(lovasz_softmax(probs, torch.from_numpy(label)))
        assert np.isclose(got, jaccard_loss_numpy(pred, label, c))


def test_matches_choquet_integral_on_soft_probabilities():
    rng = np.random.default_rng(1)
    c = 3
    label = rng.integers(0, c, size=(1, 4, 5))
    logits = torch.from_numpy(rng.normal(size=(1, c, 4, 5)))
    probs = torch.softmax(logits, 1)
    got = float(lovasz_softmax(probs, torch.from_numpy(label)))
    p = probs.numpy()[0].reshape(c, -1)
    y = label.reshape(-1)
    ref = np.mean([choquet_numpy(np.abs((y == k) - p[k]), y == k) for k in range(c) if (y == k).any()])
    assert np.isclose(got, ref)


def test_per_image_and_module_gradient():
    rng = np.random.default_rng(2)
    label = torch.from_numpy(rng.integers(0, 3, size=(2, 4, 4)))
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = LovaszSoftmaxLoss(per_image=True)(logits, label)
    probs = torch.softmax(logits.detach(), 1)
    ref = np.mean([float(lovasz_softmax(probs[i:i + 1], label[i:i + 1])) for i in range(2)])
    assert np.isclose(float(loss), ref)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_lovasz_with_ce_weight_trains_both_parts():
    """loss.type=lovasz with loss.ce_weight > 0 is Lovász + ce_weight x CE (it was silently Lovász)."""
    import torch.nn.functional as F

    from segreward.engine import config_from_dict
    from segreward.engine.builders import LovaszPlusCE, build_loss
    from segreward.lovasz import LovaszSoftmaxLoss

    cfg = config_from_dict({"loss": {"type": "lovasz", "ce_weight": 0.5}})
    loss, name = build_loss(cfg, 3, 255)
    assert isinstance(loss, LovaszPlusCE) and name == "loss_lovasz_ce"
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    want = LovaszSoftmaxLoss(255)(logits, target) + 0.5 * F.cross_entropy(logits, target)
    assert torch.allclose(loss(logits, target), want)
    assert set(loss.diagnostics) == {"part_lovasz", "part_ce"}
    plain, name = build_loss(config_from_dict({"loss": {"type": "lovasz"}}), 3, 255)
    assert isinstance(plain, LovaszSoftmaxLoss) and name == "loss_lovasz"
