"""Metrics against an independent numpy reference of mmseg's ``intersect_and_union`` and against
torchmetrics."""

import math

import numpy as np
import pytest
import torch

from segreward import SegrewardError
from segreward.metrics import SegMetric, class_stats, confusion_matrix
from segreward.rewards import dice, miou, pixel_accuracy, weighted_miou


def ref_intersect_and_union(pred, label, num_classes, ignore_index):
    """mmseg's definition, written independently with numpy (one image)."""
    keep = label != ignore_index
    p, l = pred[keep], label[keep]
    inter = np.bincount(p[p == l], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_l = np.bincount(l, minlength=num_classes)[:num_classes]
    return inter, area_p + area_l - inter, area_p, area_l


def random_batch(seed, n=5, c=6, h=17, w=23, absent=(4,)):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, size=(n, h, w))
    pred = np.where(rng.random((n, h, w)) < 0.6, label, rng.integers(0, c, size=(n, h, w)))
    for a in absent:  # a class absent from label and prediction everywhere
        label[label == a] = 0
        pred[pred == a] = 1
    label[rng.random((n, h, w)) < 0.1] = 255
    return pred, label


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_stats_match_numpy_reference(seed):
    pred, label = random_batch(seed)
    inter, union, area_p, area_l = class_stats(torch.from_numpy(pred), torch.from_numpy(label), 6, 255)
    for i in range(pred.shape[0]):
        ref = ref_intersect_and_union(pred[i], label[i], 6, 255)
        for got, want in zip((inter[i], union[i], area_p[i], area_l[i]), ref):
            np.testing.assert_array_equal(got.numpy(), want)


def test_confusion_matrix_rows_are_labels():
    pred = torch.tensor([[[0, 1], [1, 1]]])
    label = torch.tensor([[[0, 0], [1, 255]]])
    cm = confusion_matrix(pred, label, 2)
    assert cm.tolist() == [[[1, 1], [0, 1]]]


@pytest.mark.parametrize("seed", [0, 3])
def test_segmetric_dataset_level_matches_reference(seed):
    pred, label = random_batch(seed, n=6)
    metric = SegMetric(6)
    metric.update(torch.from_numpy(pred[:3]), torch.from_numpy(label[:3]))
    metric.update(torch.from_numpy(pred[3:]), torch.from_numpy(label[3:]))
    got = metric.compute()
    tot = [sum(x) for x in zip(*(ref_intersect_and_union(pred[i], label[i], 6, 255) for i in range(6)))]
    inter, union, area_p, area_l = (np.asarray(t, dtype=np.float64) for t in tot)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc, dsc = inter / union, inter / area_l, 2 * inter / (area_p + area_l)
    assert got["aAcc"] == pytest.approx(100 * inter.sum() / area_l.sum(), abs=1e-6)
    assert got["mIoU"] == pytest.approx(100 * np.nanmean(iou), abs=1e-6)
    assert got["mAcc"] == pytest.approx(100 * np.nanmean(acc), abs=1e-6)
    assert got["mDice"] == pytest.approx(100 * np.nanmean(dsc), abs=1e-6)
    assert math.isnan(got["IoU"][4])  # absent class: NaN, left out of the mean
    np.testing.assert_allclose(np.array(got["IoU"]), 100 * iou, atol=1e-6)


def test_segmetric_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    pred, label = random_batch(5, absent=())
    metric = SegMetric(6)
    metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    ref = tm.MulticlassJaccardIndex(num_classes=6, ignore_index=255, average="none")
    ref.update(torch.from_numpy(pred), torch.from_numpy(label))
    np.testing.assert_allclose(np.array(metric.compute()["IoU"]), 100 * ref.compute().numpy(), atol=1e-4)


def test_per_image_rewards_match_reference():
    pred, label = random_batch(7)
    weights = np.array([0.5, 1.0, 2.0, 1.5, 1.0, 3.0])
    p, l = torch.from_numpy(pred), torch.from_numpy(label)
    r_miou, r_w = miou(p, l, 6), weighted_miou(p, l, 6, weights)
    r_dice, r_acc = dice(p, l, 6), pixel_accuracy(p, l)
    for i in range(pred.shape[0]):
        inter, union, ap, al = (x.astype(np.float64) for x in ref_intersect_and_union(pred[i], label[i], 6, 255))
        present = union > 0
        iou = inter[present] / union[present]
        assert float(r_miou[i]) == pytest.approx(iou.mean(), abs=1e-6)
        assert float(r_w[i]) == pytest.approx((iou * weights[present]).sum() / weights[present].sum(), abs=1e-6)
        den = ap + al
        assert float(r_dice[i]) == pytest.approx((2 * inter[den > 0] / den[den > 0]).mean(), abs=1e-6)
        keep = label[i] != 255
        assert float(r_acc[i]) == pytest.approx((pred[i][keep] == label[i][keep]).mean(), abs=1e-6)


def test_reward_of_fully_ignored_image_is_zero():
    label = torch.full((1, 4, 4), 255)
    assert float(miou(torch.zeros(1, 4, 4, dtype=torch.long), label, 3)) == 0.0


def test_out_of_range_label_names_the_values():
    label = torch.tensor([[[0, 7], [9, 255]]])
    with pytest.raises(SegrewardError, match=r"\[7, 9\]"):
        confusion_matrix(torch.zeros_like(label), label, 3)


def test_shape_mismatch_is_clear():
    with pytest.raises(SegrewardError, match="shape"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), 3)
