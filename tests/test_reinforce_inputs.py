"""Bad library inputs to ReinforceLoss / RewardWeightedCELoss give a one-line SegrewardError that
names the value (issue 15), never a bare RuntimeError/TypeError from deep inside torch; and the
cross-entropy anchor of a batch with every label ignored is 0, not NaN."""

import json
import math

import pytest
import torch

from segreward import ReinforceLoss, RewardWeightedCELoss, SegrewardError

C = 3


def one_line_error(fn, *names):
    """Run ``fn``; it must raise a SegrewardError whose message is one line and contains ``names``."""
    with pytest.raises(SegrewardError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def inputs(b=2, h=4, w=4):
    torch.manual_seed(0)
    return torch.randn(b, C, h, w), torch.randint(0, C, (b, h, w))


# --- a reward callable's output -------------------------------------------------------------

def bad_shape(pred, target):
    return torch.zeros(pred.shape[0], 2)


def scalar(pred, target):
    return torch.tensor(0.5)


def one_too_many(pred, target):
    return torch.zeros(pred.shape[0] + 1)


def strings(pred, target):
    return ["good"] * pred.shape[0]


def a_list(pred, target):
    return [0.5] * pred.shape[0]


def returns_none(pred, target):
    return None


def nan_reward(pred, target):
    out = torch.ones(pred.shape[0])
    out[0] = float("nan")
    return out


def inf_reward(pred, target):
    return torch.full((pred.shape[0],), float("inf"))


def complex_reward(pred, target):
    return torch.zeros(pred.shape[0], dtype=torch.complex64)


@pytest.mark.parametrize("scope", ["image", "batch"])
@pytest.mark.parametrize("reward, shown", [
    (bad_shape, "(6, 2)"),  # image scope: K * B = 3 * 2 images; batch scope: (3, 2)
    (scalar, "()"),
    (one_too_many, "(7,)"),
    (strings, "'good'"),
    (a_list, "list [0.5"),
    (returns_none, "NoneType"),
    (nan_reward, "nan"),
    (inf_reward, "inf"),
    (complex_reward, "complex64"),
])
def test_a_reward_returning_the_wrong_shape_type_or_value_is_named(reward, shown, scope):
    if scope == "batch":
        shown = {"(6, 2)": "(3, 2)", "(7,)": "(4,)"}.get(shown, shown)
    loss_fn = ReinforceLoss(C, reward=reward, k=3, scope=scope)
    logits, target = inputs()
    one_line_error(lambda: loss_fn(logits, target), repr(reward.__name__), shown)


def test_a_reward_of_an_integer_or_bool_tensor_still_works():
    logits, target = inputs()
    for reward in (lambda p, t: (p == t).flatten(1).sum(1), lambda p, t: (p == t).flatten(1).all(1)):
        loss = ReinforceLoss(C, reward=reward, k=3)(logits.requires_grad_(True), target)
        assert torch.isfinite(loss)


# --- an empty batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: ReinforceLoss(C),
    lambda: ReinforceLoss(C, estimator="local", scope="batch"),
    lambda: ReinforceLoss(C, ce_weight=1.0, scope="running"),
    lambda: RewardWeightedCELoss(C),
])
@pytest.mark.parametrize("b, h, w", [(0, 4, 4), (2, 0, 4), (2, 4, 0)])
def test_an_empty_batch_is_an_error(make, b, h, w):
    logits, target = torch.randn(b, C, h, w), torch.zeros(b, h, w, dtype=torch.long)
    one_line_error(lambda: make()(logits, target), "empty batch", str((b, C, h, w)), str((b, h, w)))


# --- class weights: lists and weights.json paths -----------------------------------------------

def test_class_weight_from_a_weights_json_path_equals_the_list(tmp_path):
    weights = [0.5, 2.0, 1.25]
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"method": "cvc", "weights": weights}))
    for cls in (ReinforceLoss, RewardWeightedCELoss):
        for value in (path, str(path)):
            assert cls(C, class_weight=value).class_weight.tolist() == weights
    logits, target = inputs()
    a = ReinforceLoss(C, k=2, ce_weight=1.0, class_weight=path)
    b = ReinforceLoss(C, k=2, ce_weight=1.0, class_weight=weights)
    torch.manual_seed(1)
    la = a(logits, target)
    torch.manual_seed(1)
    assert torch.equal(la, b(logits, target))


@pytest.mark.parametrize("cls", [ReinforceLoss, RewardWeightedCELoss])
@pytest.mark.parametrize("case", ["missing", "not_json", "no_list", "wrong_length", "negative_in_file",
                                  "negative", "nan", "too_few", "not_numbers"])
def test_bad_class_weights_are_named(cls, case, tmp_path):
    path = tmp_path / "weights.json"
    if case == "missing":
        value, shown = tmp_path / "nowhere" / "weights.json", ["nowhere", "not found"]
    elif case == "not_json":
        path.write_text("weights: [1, 2, 3]")
        value, shown = path, [str(path), "JSON"]
    elif case == "no_list":
        path.write_text(json.dumps({"counts": [1, 2, 3]}))
        value, shown = path, [str(path), "counts"]
    elif case == "wrong_length":
        path.write_text(json.dumps({"weights": [1.0, 2.0]}))
        value, shown = path, [str(path), "2 class weights"]
    elif case == "negative_in_file":
        path.write_text(json.dumps([1.0, -2.0, 1.0]))
        value, shown = path, [str(path), "-2.0"]
    elif case == "negative":
        value, shown = [1.0, -1.5, 2.0], ["-1.5", "classes [1]"]
    elif case == "nan":
        value, shown = [1.0, 1.0, math.nan], ["nan", "classes [2]"]
    elif case == "too_few":
        value, shown = [1.0, 2.0], ["2 entries", "3 classes"]
    else:
        value, shown = ["a", "b", "c"], ["'a'"]
    one_line_error(lambda: cls(C, class_weight=value), *shown)


# --- options: whole numbers and ranges ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, shown", [
    (dict(k=2.5), "k must be a whole number >= 1, got 2.5"),
    (dict(k=0), "got 0"),
    (dict(k="four"), "'four'"),
    (dict(num_classes=2.5), "num_classes must be a whole number >= 1, got 2.5"),
    (dict(num_classes=0), "num_classes must be a whole number >= 1, got 0"),
    (dict(ignore_index=254.5), "ignore_index must be a whole number, got 254.5"),
    (dict(scope="running", momentum=1.0), "[0, 1), got 1.0"),
    (dict(scope="running", momentum=-0.1), "got -0.1"),
    (dict(scope="running", momentum=math.nan), "got nan"),
    (dict(momentum="high"), "momentum must be a number, got 'high'"),
    (dict(ema_momentum=1.5), "ema_momentum must be in [0, 1], got 1.5"),
    (dict(ce_weight=-1.0), "got -1.0"),
    (dict(ce_weight=math.nan), "got nan"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
])
def test_bad_numeric_options_are_named(kwargs, shown):
    kwargs = {"num_classes": C, **kwargs}
    one_line_error(lambda: ReinforceLoss(**kwargs), shown)


def test_whole_floats_are_accepted():
    loss_fn = ReinforceLoss(3.0, k=4.0)
    assert (loss_fn.num_classes, loss_fn.k) == (3, 4)
    assert isinstance(loss_fn.k, int)


@pytest.mark.parametrize("value", [2.5, 0])
def test_reward_weighted_ce_num_classes_is_a_whole_number(value):
    one_line_error(lambda: RewardWeightedCELoss(value), f"got {value}")


# --- logits / label shapes and types -----------------------------------------------------------

@pytest.mark.parametrize("logits, target, shown", [
    (torch.randn(3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), ["(3, 4, 4)", "(1, 4, 4)"]),
    (torch.randn(1, 3, 4, 4), torch.zeros(4, 4, dtype=torch.long), ["(1, 3, 4, 4)", "(4, 4)"]),
    (torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long), ["(1, 3, 4, 4)", "(1, 2, 4, 4)"]),
    (torch.randn(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long), ["(2, 3, 4, 4)", "(3, 4, 4)"]),
    (torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), ["(1, 4, 4, 4)", "(1, 4, 4)", "num_classes=3"]),
    (torch.randn(1, 3, 8, 4), torch.zeros(1, 4, 4, dtype=torch.long), ["(1, 3, 8, 4)", "(1, 4, 4)"]),
    (torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), ["torch.int64"]),
    (torch.randn(1, 3, 4, 4).numpy(), torch.zeros(1, 4, 4, dtype=torch.long), ["ndarray"]),
    (torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 1 / 255), [str(1 / 255)[:6]]),
    (torch.randn(1, 3, 4, 4), torch.tensor([[[0, 3, 7, 255]] * 4]), ["[3, 7]"]),
])
@pytest.mark.parametrize("make", [lambda: ReinforceLoss(C), lambda: ReinforceLoss(C, estimator="local"),
                                  lambda: RewardWeightedCELoss(C)])
def test_logits_and_label_mismatches_name_both(logits, target, shown, make):
    one_line_error(lambda: make()(logits, target), *shown)


def test_whole_float_labels_and_a_channel_dim_are_accepted():
    logits, target = inputs()
    loss = ReinforceLoss(C, k=2)(logits, target.float().unsqueeze(1))
    assert torch.isfinite(loss)


# --- the cross-entropy anchor when nothing is labelled -----------------------------------------

@pytest.mark.parametrize("make", [
    lambda: ReinforceLoss(C, k=2, ce_weight=1.0),
    lambda: ReinforceLoss(C, k=2, ce_weight=1.0, class_weight=[1.0, 2.0, 0.5]),
    lambda: ReinforceLoss(C, estimator="local", scope="batch", ce_weight=1.0),
    lambda: ReinforceLoss(C, k=2, ce_weight=1.0, scope="running"),
    lambda: RewardWeightedCELoss(C),
    lambda: RewardWeightedCELoss(C, class_weight=[1.0, 2.0, 0.5]),
])
def test_every_label_ignored_gives_zero_loss_not_nan(make):
    # F.cross_entropy's mean over no labelled pixel is 0 / 0 = NaN; the anchor must contribute 0.
    logits = torch.randn(2, C, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = make()(logits, target)
    assert float(loss) == 0.0
    loss.backward()
    assert logits.grad is None or bool(torch.isfinite(logits.grad).all())


def test_labelled_pixels_only_of_weight_zero_give_zero_anchor_not_nan():
    logits = torch.randn(2, C, 4, 4, requires_grad=True)
    target = torch.ones(2, 4, 4, dtype=torch.long)
    loss_fn = ReinforceLoss(C, k=2, baseline="none", ce_weight=1.0, class_weight=[1.0, 0.0, 1.0])
    loss = loss_fn(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_the_anchor_is_unchanged_when_pixels_are_labelled():
    logits, target = inputs()
    target[0, 0] = 255
    w = torch.tensor([1.0, 2.0, 0.5])
    anchored = ReinforceLoss(C, k=2, baseline="none", ce_weight=0.5, class_weight=w)
    plain = ReinforceLoss(C, k=2, baseline="none")
    torch.manual_seed(3)
    a = anchored(logits, target)
    torch.manual_seed(3)
    b = plain(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert torch.equal(a, b + 0.5 * ce)
