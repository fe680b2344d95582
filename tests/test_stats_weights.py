"""Class weights (segreward.stats.weights) against values computed by hand.

Counts C = [10, 30, 60], T = 100, N = 3 throughout; each expected value is worked out in the
comment above it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segreward.errors import SegrewardError
from segreward.stats import WEIGHT_METHODS, class_weights, load_class_weights

COUNTS = [10, 30, 60]


def test_cvc_hand_computed():
    # s = 0.1: 1/(10+10) = 0.05, 1/(30+10) = 0.025, 1/(60+10) = 1/70; sum = 0.0892857
    # w = 3 * raw / sum = 1.68, 0.84, 0.48
    cw = class_weights(COUNTS, "cvc", smooth=0.1)
    np.testing.assert_allclose(cw.weights, [1.68, 0.84, 0.48], rtol=1e-12)
    # s = 0.5: 1/60, 1/80, 1/110 -> times 3/sum(...) with sum = 0.0382576 -> 1.30693, 0.98020, 0.71287
    np.testing.assert_allclose(class_weights(COUNTS, "cvc", smooth=0.5).weights, [1.30693, 0.98020, 0.71287],
                               atol=1e-5)
    # without normalisation: the raw formula
    np.testing.assert_allclose(class_weights(COUNTS, "cvc", smooth=0.1, normalize=False).weights,
                               [0.05, 0.025, 1 / 70])


def test_inv_freq_hand_computed():
    # 1/f = 10, 3.333, 1.667; sum 15 -> 2, 0.6667, 0.3333
    np.testing.assert_allclose(class_weights(COUNTS, "inv_freq").weights, [2, 2 / 3, 1 / 3])


def test_sqrt_inv_freq_hand_computed():
    # sqrt(10) = 3.16228, sqrt(3.33333) = 1.82574, sqrt(1.66667) = 1.29099; sum 6.27901
    # -> 1.51088, 0.87231, 0.61681
    np.testing.assert_allclose(class_weights(COUNTS, "sqrt_inv_freq").weights, [1.51088, 0.87231, 0.61681],
                               atol=1e-5)


def test_median_freq_hand_computed():
    # P (pixels in the images where the class occurs) = 100, 60, 100 -> g = 0.1, 0.5, 0.6;
    # median 0.5 -> raw 5, 1, 0.8333; normalised (sum 6.8333): 2.19512, 0.43902, 0.36585
    cw = class_weights(COUNTS, "median_freq", pixels_in_images_with_class=[100, 60, 100], normalize=False)
    np.testing.assert_allclose(cw.weights, [5, 1, 5 / 6])
    cw = class_weights(COUNTS, "median_freq", pixels_in_images_with_class=[100, 60, 100])
    np.testing.assert_allclose(cw.weights, [2.19512, 0.43902, 0.36585], atol=1e-5)
    with pytest.raises(SegrewardError, match="pixels_in_images_with_class"):
        class_weights(COUNTS, "median_freq")


def test_effective_num_hand_computed():
    # beta = 0.9: 0.9^10 = 0.348678, 0.9^30 = 0.042391, 0.9^60 = 0.001797
    # raw = 0.1 / (1 - beta^C) = 0.153534, 0.104427, 0.100180; sum 0.358141 -> 1.28609, 0.87474, 0.83917
    cw = class_weights(COUNTS, "effective_num", beta=0.9)
    np.testing.assert_allclose(cw.weights, [1.28609, 0.87474, 0.83917], atol=1e-5)
    # beta = 0: every class has effective number 1 -> equal weights
    np.testing.assert_allclose(class_weights(COUNTS, "effective_num", beta=0).weights, [1, 1, 1])


def test_effective_num_close_to_one_is_exact_and_saturation_warns():
    # beta = 1 - 1e-12 with counts ~1e6: 1 - beta^C ~= C * 1e-12, so raw ~= 1/C (inverse frequency)
    counts = [1_000_000, 3_000_000, 6_000_000]
    cw = class_weights(counts, "effective_num", beta=1 - 1e-12)
    np.testing.assert_allclose(cw.weights, [2, 2 / 3, 1 / 3], rtol=1e-5)
    with pytest.warns(UserWarning, match="beta closer to 1"):
        cw = class_weights(counts, "effective_num", beta=0.9999)
    np.testing.assert_allclose(cw.weights, [1, 1, 1], atol=1e-6)


def test_zero_count_classes_are_explicit():
    counts = [10, 30, 60, 0]
    # default: the zero class gets the raw weight of the rarest class (inv_freq: 10), then all four
    # are normalised: raw 10, 3.333, 1.667, 10; sum 25 -> 1.6, 0.5333, 0.2667, 1.6
    with pytest.warns(UserWarning, match=r"1 class\(es\) have zero pixels.*3 \(3\)"):
        cw = class_weights(counts, "inv_freq")
    np.testing.assert_allclose(cw.weights, [1.6, 8 / 15, 4 / 15, 1.6])
    assert cw.zero_classes == [3] and cw.warnings
    # zero_weight=0: the other three average 1 among themselves, the zero class gets exactly 0
    with pytest.warns(UserWarning, match="get weight 0"):
        cw = class_weights(counts, "inv_freq", zero_weight=0.0)
    np.testing.assert_allclose(cw.weights, [2, 2 / 3, 1 / 3, 0])
    # never inf / NaN, for every method, even with smooth = 0
    for method in WEIGHT_METHODS:
        with pytest.warns(UserWarning):
            cw = class_weights([0, 5, 0, 20], method, smooth=0.0, pixels_in_images_with_class=[0, 50, 0, 50])
        assert np.all(np.isfinite(cw.weights)), method
        assert cw.weights[0] == cw.weights[2] == cw.weights.max()


def test_max_weight_caps_without_renormalising():
    # inv_freq: 2, 0.6667, 0.3333 -> cap 1.5
    cw = class_weights(COUNTS, "inv_freq", max_weight=1.5)
    np.testing.assert_allclose(cw.weights, [1.5, 2 / 3, 1 / 3])
    assert cw.capped_classes == [0]


def test_bad_arguments():
    with pytest.raises(SegrewardError, match="unknown weighting method 'foo'.*cvc"):
        class_weights(COUNTS, "foo")
    with pytest.raises(SegrewardError, match="every class has zero pixels"):
        class_weights([0, 0], "cvc")
    with pytest.raises(SegrewardError, match="beta must be in"):
        class_weights(COUNTS, "effective_num", beta=1.0)
    with pytest.raises(SegrewardError, match="smooth must be"):
        class_weights(COUNTS, "cvc", smooth=-1)
    with pytest.raises(SegrewardError, match="max_weight"):
        class_weights(COUNTS, max_weight=0)


def test_mmseg_line_and_json_round_trip(tmp_path):
    cw = class_weights(COUNTS, "cvc", smooth=0.1, class_names=["a", "b", "c"])
    assert cw.mmseg_line() == "class_weight=[1.6800, 0.8400, 0.4800]"
    path = cw.save(tmp_path / "w" / "weights.json")
    data = json.loads(path.read_text())
    assert data["method"] == "cvc" and data["params"]["smooth"] == 0.1 and data["class_names"] == ["a", "b", "c"]
    assert load_class_weights(path) == pytest.approx([1.68, 0.84, 0.48])
    assert load_class_weights(path, num_classes=3) == pytest.approx([1.68, 0.84, 0.48])


def test_load_class_weights_plain_list_and_errors(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("[1, 2.5, 0]")
    assert load_class_weights(plain) == [1.0, 2.5, 0.0]
    mm = tmp_path / "mm.json"
    mm.write_text('{"class_weight": [0.8, 1.2]}')
    assert load_class_weights(mm) == [0.8, 1.2]
    with pytest.raises(SegrewardError, match=r"plain\.json: 3 class weights for a model with 19 classes"):
        load_class_weights(plain, num_classes=19)
    with pytest.raises(SegrewardError, match=r"missing\.json: class weights file not found"):
        load_class_weights(tmp_path / "missing.json")
    cases = {"notjson.json": ("{oops", "not a readable JSON"), "nan.json": ("[1, NaN]", "weight 1 is nan"),
             "neg.json": ("[1, -2]", "weight 1 is -2"), "str.json": ('["a"]', "weight 0 is 'a'"),
             "empty.json": ("[]", "non-empty list"), "obj.json": ('{"x": 1}', "no 'weights' list")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SegrewardError, match=rf"{name}: .*{message}"):
            load_class_weights(tmp_path / name)
    assert not math.isnan(sum(load_class_weights(plain)))
