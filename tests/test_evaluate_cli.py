"""`segreward evaluate MODEL DATA`: dataset-level scores checked against a numpy confusion-matrix
computation written here (mmseg's IoUMetric definition), and against `segreward calibrate`'s own
`reward_after` for the calibrated weights it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segreward.cli import main
from segreward.engine import config_from_dict, train
from segreward.engine.builders import build_data
from segreward.models import load_model

DUSK = {"type": "synthetic", "style": "dusk", "n": 5, "split": "val", "size": [32, 32]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("ev") / "run"
    train(config_from_dict({"name": "t", "work_dir": str(work), "model": {"name": "unet", "options": {"width": 8}},
                            "data": {"train": {"type": "synthetic", "style": "day", "n": 8, "size": [32, 32]},
                                     "val": {"dusk": DUSK}},
                            "train": {"iters": 6, "batch_size": 4, "eval_every": 6, "progress": False},
                            "optim": {"lr": 0.01}}))
    return work


def numpy_scores(model, dataset, num_classes, ignore=255):
    """mmseg's IoUMetric, by hand: one summed confusion matrix, NaN classes out of the means."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    model.eval()
    for i in range(len(dataset)):
        x, y = dataset[i]
        with torch.no_grad():
            pred = model(x[None]).argmax(1)[0].numpy()
        y = y.numpy()
        keep = y != ignore
        cm += np.bincount(y[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(num_classes, -1)
    inter, label, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (label + predicted - inter)
        acc = inter / label
        dice = 2 * inter / (label + predicted)
    return {"IoU": 100 * iou, "mIoU": 100 * np.nanmean(iou), "aAcc": 100 * inter.sum() / label.sum(),
            "mAcc": 100 * np.nanmean(acc), "mDice": 100 * np.nanmean(dice), "pixels": int(label.sum())}


def spec_file(tmp_path, spec=DUSK):
    path = tmp_path / "dusk.yaml"
    path.write_text(json.dumps(spec))
    return path


def test_evaluate_matches_a_numpy_confusion_matrix(run_dir, tmp_path, capsys):
    assert main(["evaluate", str(run_dir), str(spec_file(tmp_path)), "--json", "--no-progress",
                 "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    dataset = build_data(DUSK)
    ref = numpy_scores(load_model(run_dir / "model.safetensors"), dataset, len(dataset.classes))
    got = out["scores"]
    for key in ("mIoU", "aAcc", "mAcc", "mDice"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    np.testing.assert_allclose([np.nan if v is None else v for v in got["IoU"]], ref["IoU"], atol=1e-6)
    assert got["pixels"] == ref["pixels"] and got["classes"] == list(dataset.classes)
    assert out["data"]["images"] == 5 and out["data"]["labelled_pixels"] == ref["pixels"]
    assert out["data"]["kind"] == "dataset spec" and out["model"].endswith("model.safetensors")


def test_evaluate_table_names_the_data_and_every_class(run_dir, tmp_path, capsys):
    assert main(["evaluate", str(run_dir / "model.safetensors"), str(spec_file(tmp_path)), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "dusk.yaml (dataset spec, type synthetic, split val): 5 images" in printed
    assert "mIoU" in printed and "mDice" in printed
    assert all(name in printed for name in build_data(DUSK).classes)


def test_evaluating_calibrated_weights_reproduces_reward_after(run_dir, tmp_path, capsys):
    spec = spec_file(tmp_path)
    out = tmp_path / "cal"
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--kfold", "0", "--no-progress"]) == 0
    record = json.loads((out / "offsets.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors"), str(spec), "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["scores"]
    assert got["mIoU"] == pytest.approx(100 * record["reward_after"], abs=1e-4)
    # The record names the data it was fitted on.
    assert record["data"]["spec"] == DUSK and record["data"]["images"] == 5
    assert record["data"]["labelled_pixels"] == got["pixels"]


def test_a_run_config_evaluates_its_val_set(run_dir, capsys):
    assert main(["evaluate", str(run_dir), str(run_dir / "config.yaml"), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["set"] == "dusk" and out["data"]["kind"] == "run config"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["scores"]["mIoU"] == pytest.approx(summary["val"]["dusk"]["mIoU"], abs=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["{run}/nope", "{spec}"], "no such run directory"),
    (["{tmp}", "{spec}"], "no model.safetensors"),
    (["{run}", "{tmp}/missing.yaml"], "not found"),
    (["{run}", "{spec}", "--device", "gpu0"], "gpu0"),
    (["{run}", "{spec}", "--batch-size", "0"], "--batch-size"),
    (["{run}", "{run}/config.yaml", "--split", "nope"], "no data.val set 'nope'"),
    (["{run}", "{spec5}"], "num_classes"),
])
def test_bad_evaluate_input_is_one_line(run_dir, tmp_path, capsys, five_class_spec, args, needle):
    argv = [a.format(run=run_dir, spec=spec_file(tmp_path), tmp=tmp_path, spec5=five_class_spec) for a in args]
    assert main(["evaluate", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_plain_folder_takes_the_model_classes(run_dir, tmp_path, capsys):
    """An mmseg-layout folder has no class list: the model's classes are used (and recorded), and
    the scores equal those of a folder spec that names them."""
    from PIL import Image
    dataset = build_data(DUSK)
    for sub in ("img_dir", "ann_dir"):
        (tmp_path / "f" / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(dataset.images[i]).save(tmp_path / "f" / "img_dir" / f"{i}.jpg")
        Image.fromarray(dataset.labels[i].astype(np.uint8)).save(tmp_path / "f" / "ann_dir" / f"{i}.png")
    assert main(["evaluate", str(run_dir), str(tmp_path / "f"), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["kind"] == "folder" and out["data"]["spec"]["classes"] == list(dataset.classes)
    spec = spec_file(tmp_path, {"type": "folder", "root": str(tmp_path / "f"), "classes": list(dataset.classes)})
    assert main(["evaluate", str(run_dir), str(spec), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == out["scores"]
