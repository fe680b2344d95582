"""Streaming calibration vs exact, k-fold estimate, DDP histograms, folding into models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segreward.calibrate import fit_offsets, fit_offsets_streaming, pixel_set
from segreward.calibrate.folding import WithOffsets, fold_offsets, fold_state_dict
from segreward.calibrate.kfold import cross_validate, fold_of_images
from segreward.calibrate.stream import ThresholdHistogram
from segreward.credit import count_form
from segreward.errors import SegrewardError


def biased_set(n=12, c=5, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[:, :2] = 255
    logits = 2.0 * torch.nn.functional.one_hot(labels.clamp(max=c - 1), c).permute(0, 3, 1, 2).float()
    logits += 1.5 * torch.randn(n, c, h, w, generator=g)
    logits[:, 1] -= 1.0
    logits[:, 3] += 0.7
    return logits, labels


def batches(logits, labels, size=4):
    return lambda: ((logits[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size))


def test_edge_rewards_are_exact_at_every_edge():
    """The histogram's reward at each bin edge equals the reward of the argmax with b_k there."""
    logits, labels = biased_set(n=3, c=4)
    ps = pixel_set(logits, labels)
    form = count_form("miou", 4)
    b = torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=torch.float64)
    h = ThresholdHistogram(b, bins=16, span=2.0)
    h.update(logits, labels)
    from segreward.calibrate.exact import set_reward
    for k in range(4):
        x, r = h.edge_rewards(form, k)
        for xe, re in zip(x[::3], r[::3]):
            bb = b.clone()
            bb[k] = xe + 1e-9  # just past the edge: the thresholds below it have moved
            assert float(re) == pytest.approx(set_reward(form, ps, bb), abs=1e-12)


@pytest.mark.parametrize("reward", ["miou", "dice"])
def test_streaming_is_within_the_bin_width_of_exact(reward):
    logits, labels = biased_set()
    exact = fit_offsets(logits, labels, reward=reward)
    stream = fit_offsets_streaming(batches(logits, labels), 5, reward=reward, bins=512, span=4.0)
    assert stream.reward_before == pytest.approx(exact.reward_before, abs=1e-12)
    assert stream.reward_after > stream.reward_before
    # Exact up to the bin width (2 * span / bins = 0.016 logits): a small reward gap at most.
    assert stream.reward_after == pytest.approx(exact.reward_after, abs=2e-3)
    assert all(b >= a - 1e-12 for a, b in zip(*_accepted(stream.history)))
    # The reported reward is that of the returned offsets.
    from segreward.calibrate.exact import set_reward
    assert set_reward(count_form(reward, 5), pixel_set(logits, labels), stream.offsets) == \
        pytest.approx(stream.reward_after, abs=1e-12)


def _accepted(history):
    """Running maximum pairs: the best scored state never gets worse."""
    best = list(np.maximum.accumulate(history))
    return best[:-1], best[1:]


def test_streaming_memory_does_not_grow_with_images():
    h1 = ThresholdHistogram(torch.zeros(5, dtype=torch.float64), bins=64, span=4.0)
    logits, labels = biased_set(n=2)
    h1.update(logits, labels)
    size = h1.hist.numel()
    logits, labels = biased_set(n=10)
    h1.update(logits, labels)
    assert h1.hist.numel() == size == 5 * 66 * 5 * 3


def test_kfold_estimate():
    logits, labels = biased_set(n=10)
    cal = fit_offsets(logits, labels, kfold=5)
    cv = cal.cv
    assert cv["k"] == 5 and len(cv["fold_gains"]) == 5
    assert cv["reward_before"] == pytest.approx(cal.reward_before, abs=1e-12)
    # Held-out gains are real but smaller than the in-sample gain, which also fits noise.
    assert 0 < cv["gain"] <= cal.reward_after - cal.reward_before + 1e-12
    folds = fold_of_images(10, 3, seed=1)
    assert sorted(torch.bincount(folds).tolist()) == [3, 3, 4]
    with pytest.raises(SegrewardError, match="at least 2"):
        cross_validate(pixel_set(logits[:1], labels[:1]), count_form("miou", 5))


def test_kfold_estimate_in_streaming_mode_matches_exact():
    """The same folds of images in both modes: the same held-out reward before calibration, and
    held-out rewards after it within the streaming fit's bin width."""
    from segreward.calibrate.passes import fit_passes
    logits, labels = biased_set(n=10)
    exact, _ = fit_passes(batches(logits, labels), 5, mode="exact", kfold=5)
    stream, pixels = fit_passes(batches(logits, labels), 5, mode="streaming", kfold=5, bins=512, span=4.0)
    assert pixels is None and stream.num_images == 10
    ce, cs = exact.cv, stream.cv
    assert cs["k"] == ce["k"] == 5 and len(cs["fold_offsets"]) == 5 and cs["mode"] == "streaming"
    assert cs["reward_before"] == pytest.approx(ce["reward_before"], abs=1e-12)
    assert cs["reward_after"] == pytest.approx(ce["reward_after"], abs=5e-3)
    assert cs["gain"] > 0


def test_folding_into_the_builtin_unet_and_wrapper():
    from segreward.models import build_model
    torch.manual_seed(0)
    model = build_model("unet", 4, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    b = torch.tensor([0.5, -1.0, 0.25, 0.0])
    with torch.no_grad():
        want = (model(x) + b.view(1, 4, 1, 1)).argmax(1)
        wrapped = WithOffsets(model, b)(x).argmax(1)
        fold_offsets(model, b)
        got = model(x).argmax(1)
    assert torch.equal(got, want) and torch.equal(wrapped, want)
    with pytest.raises(SegrewardError, match="3 offsets for a classifier with 4 classes"):
        fold_offsets(model, [0.0, 0.0, 0.0])


def test_folding_into_segformer():
    pytest.importorskip("transformers")
    from segreward.models import build_model
    torch.manual_seed(0)
    model = build_model("segformer", 3, variant="tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    b = torch.tensor([1.0, -0.5, 0.2])
    with torch.no_grad():
        want = (model(x) + b.view(1, 3, 1, 1)).argmax(1)
        fold_offsets(model, b)
        assert torch.equal(model(x).argmax(1), want)
        # The library model itself, without our adapter.
        hf = model.model
        want = (hf(pixel_values=x).logits + b.view(1, 3, 1, 1)).argmax(1)
        fold_offsets(hf, b)
        assert torch.equal(hf(pixel_values=x).logits.argmax(1), want)


def test_no_bias_needs_the_wrapper():
    class Net(torch.nn.Module):
        classifier_name = "head"

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 2, 1, bias=False)

        def forward(self, x):
            return self.head(x)

    with pytest.raises(SegrewardError, match="no bias.*WithOffsets"):
        fold_offsets(Net(), [0.1, -0.1])
    out = WithOffsets(Net(), [0.1, -0.1])(torch.randn(1, 3, 4, 4))
    assert out.shape == (1, 2, 4, 4)


def test_fold_state_dict_finds_mmseg_head():
    sd = {"backbone.x": torch.zeros(2), "decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1),
          "decode_head.conv_seg.bias": torch.tensor([1.0, 2.0, 3.0]),
          "auxiliary_head.conv_seg.bias": torch.zeros(3)}
    out, key = fold_state_dict(sd, [0.5, 0.0, -0.5])
    assert key == "decode_head.conv_seg.bias"
    assert out[key].tolist() == [1.5, 2.0, 2.5] and sd[key].tolist() == [1.0, 2.0, 3.0]
    assert out["auxiliary_head.conv_seg.bias"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(SegrewardError, match="cannot fold"):
        fold_state_dict({"a.weight": torch.zeros(1)}, [0.0])
