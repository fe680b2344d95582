"""``python -m segreward.mmseg.calibrate``: a tiny mmseg model calibrated on its config's data, the
calibrated checkpoint loaded back by mmseg's own test loop (``Runner.test``, what ``tools/test.py``
runs) and ``init_model``, which must report the mIoU the fit promised.

Skipped without the ``mmseg`` extra. Model and data are those of ``tests/test_mmseg.py``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mmseg")
pytest.importorskip("mmengine")

import torch  # noqa: E402
from test_mmseg import NUM_CLASSES, _base_config, _build_model, _write_data  # noqa: E402

from segreward.mmseg.calibrate import main, split_dataloader_cfg  # noqa: E402

PROG = "segreward.mmseg.calibrate"


def _config(data_root: Path) -> dict:
    """The tiny base config plus a test set (the 6 'train' images, batches of 2) and a training
    pipeline with augmentation that calibration on ``--split train`` must not use."""
    cfg = _base_config(data_root)
    # Output stride 4 (8 x 8 features for 32 x 32 images): logits that vary inside an image.
    cfg["model"]["backbone"]["strides"] = (1, 1, 1, 1)
    test_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    cfg["test_pipeline"] = test_pipeline
    cfg["train_dataloader"]["dataset"]["pipeline"] = [
        dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="RandomFlip", prob=1.0),
        dict(type="PackSegInputs")]
    cfg["test_dataloader"] = dict(batch_size=2, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                                  dataset=dict(cfg["val_dataloader"]["dataset"], pipeline=test_pipeline,
                                               data_prefix=dict(img_path="img_dir/train",
                                                                seg_map_path="ann_dir/train")))
    cfg["test_evaluator"] = dict(type="IoUMetric", iou_metrics=["mIoU"])
    cfg["test_cfg"] = dict(type="TestLoop")
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file and a random-weight checkpoint (logits scaled to a few units, so the classes
    are far from ties and float32 folding is exact in argmax)."""
    from mmengine.config import Config

    tmp = tmp_path_factory.mktemp("mmseg_cal")
    data_root = tmp / "data"
    _write_data(data_root)
    Config(_config(data_root)).dump(str(tmp / "tiny.py"))
    torch.manual_seed(0)
    model = _build_model(Config.fromfile(str(tmp / "tiny.py")).model)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.mul_(100.0)
        model.decode_head.conv_seg.bias.copy_(torch.randn(NUM_CLASSES))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": {"note": "kept"}}, tmp / "model.pth")
    return dict(tmp=tmp, config=tmp / "tiny.py", checkpoint=tmp / "model.pth", state=state)


def _calibrate(setup, out: Path, *extra) -> int:
    return main([str(setup["config"]), str(setup["checkpoint"]), "--out", str(out), "--work-dir",
                 str(out.parent / "work"), "--no-progress", *extra])


def _mmseg_test(config: Path, checkpoint: Path, work_dir: Path, monkeypatch) -> tuple[dict, float]:
    """mmseg's test loop on ``checkpoint`` (``tools/test.py``): its reported metrics, and the
    unrounded mIoU (percent) from the IoUMetric's own per-image areas."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmseg.evaluation import IoUMetric

    captured = {}
    original = IoUMetric.compute_metrics

    def compute_metrics(self, results):
        captured["areas"] = [sum(r[j] for r in results) for j in range(4)]
        return original(self, results)

    monkeypatch.setattr(IoUMetric, "compute_metrics", compute_metrics)
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.load_from = str(checkpoint)
    cfg.visualizer.name = f"visualizer_{uuid.uuid4().hex}"
    metrics = Runner.from_cfg(cfg).test()
    monkeypatch.setattr(IoUMetric, "compute_metrics", original)
    inter, union = (captured["areas"][0].double(), captured["areas"][1].double())
    iou = (inter / union)[union > 0]
    return metrics, float(iou.mean()) * 100


@pytest.fixture(scope="module")
def calibrated(setup):
    out = setup["tmp"] / "cal" / "calibrated.pth"
    assert _calibrate(setup, out, "--split", "test", "--kfold", "3") == 0
    return dict(out=out, record=json.loads((out.parent / "offsets.json").read_text()))


def test_mmseg_test_loop_reports_the_fitted_miou(setup, calibrated, tmp_path, monkeypatch):
    record = calibrated["record"]
    assert record["mode"] == "exact" and record["reward"] == "miou" and record["split"] == "test"
    assert record["reward_after"] > record["reward_before"]
    assert abs(sum(record["offsets"])) < 1e-9 and len(record["offsets"]) == NUM_CLASSES
    after, after_exact = _mmseg_test(setup["config"], calibrated["out"], tmp_path / "after", monkeypatch)
    assert after_exact == pytest.approx(100 * record["reward_after"], abs=1e-3)
    assert after["mIoU"] == pytest.approx(round(100 * record["reward_after"], 2), abs=1e-3)
    before, before_exact = _mmseg_test(setup["config"], setup["checkpoint"], tmp_path / "before", monkeypatch)
    assert before_exact == pytest.approx(100 * record["reward_before"], abs=1e-3)


def test_calibrated_checkpoint_is_the_input_with_the_bias_folded(setup, calibrated):
    from mmengine.runner.checkpoint import CheckpointLoader

    ckpt = CheckpointLoader.load_checkpoint(str(calibrated["out"]), map_location="cpu")
    offsets = torch.tensor(calibrated["record"]["offsets"])
    key = "decode_head.conv_seg.bias"
    assert calibrated["record"]["key"] == key
    for k, v in setup["state"].items():
        if k == key:
            torch.testing.assert_close(ckpt["state_dict"][k], v + offsets.float())
        else:
            assert torch.equal(ckpt["state_dict"][k], v), k
    meta = ckpt["meta"]
    assert meta["note"] == "kept"
    assert meta["segreward_calibration"]["offsets"] == calibrated["record"]["offsets"]
    assert list(meta["dataset_meta"]["classes"]) == ["a", "b", "c", "d"]
    # Plain data: loads without unpickling code, as the input did.
    torch.load(calibrated["out"], map_location="cpu", weights_only=True)


def test_argmax_of_folded_model_is_argmax_of_logits_plus_offsets(setup, calibrated):
    from mmengine.config import Config
    from mmseg.apis import inference_model, init_model

    images = sorted((setup["tmp"] / "data" / "img_dir" / "train").glob("*.png"))
    cfg = Config.fromfile(str(setup["config"]))
    folded = init_model(Config.fromfile(str(setup["config"])), str(calibrated["out"]), device="cpu")
    plain = init_model(cfg, str(setup["checkpoint"]), device="cpu")
    offsets = torch.tensor(calibrated["record"]["offsets"]).view(-1, 1, 1)
    for image in images:
        a, b = inference_model(folded, str(image)), inference_model(plain, str(image))
        shifted = b.seg_logits.data.double() + offsets.double()
        torch.testing.assert_close(a.seg_logits.data.double(), shifted, atol=1e-4, rtol=0)
        assert torch.equal(a.pred_sem_seg.data[0], shifted.argmax(0))


def test_report_and_logs(setup, calibrated):
    out_dir = calibrated["out"].parent
    runs = sorted((out_dir / "work").iterdir())
    assert len(runs) == 1
    log = (runs[0] / f"{runs[0].name}.log").read_text()
    assert "3-fold estimate" in log and "IoU before" in log and "calibrated checkpoint" in log
    lines = [json.loads(x) for x in (runs[0] / "vis_data" / "scalars.json").read_text().splitlines()]
    final = [x for x in lines if "calibrate.reward_after" in x]
    assert len(final) == 1 and final[0]["calibrate.reward_after"] == pytest.approx(calibrated["record"]["reward_after"])
    sweeps = [x for x in lines if "calibrate.reward" in x]
    assert [x["step"] for x in sweeps] == list(range(1, calibrated["record"]["sweeps"] + 1))
    assert (runs[0] / "vis_data" / "config.py").is_file()


def test_train_split_runs_the_test_pipeline_in_order(setup, calibrated, tmp_path):
    from mmengine.config import Config

    cfg = Config.fromfile(str(setup["config"]))
    loader = split_dataloader_cfg(cfg, "train")
    assert [t["type"] for t in loader["dataset"]["pipeline"]] == ["LoadImageFromFile", "LoadAnnotations",
                                                                   "PackSegInputs"]
    assert loader["sampler"] == dict(type="DefaultSampler", shuffle=False) and loader["batch_size"] == 1
    # The train split holds the test split's images: same logits, same fit.
    out = tmp_path / "train.pth"
    assert _calibrate(setup, out, "--split", "train", "--kfold", "0") == 0
    record = json.loads((tmp_path / "offsets.json").read_text())
    assert record["split"] == "train" and record["cv"] is None
    assert record["reward_before"] == pytest.approx(calibrated["record"]["reward_before"], abs=1e-12)
    assert record["reward_after"] == pytest.approx(calibrated["record"]["reward_after"], abs=1e-12)
    assert record["offsets"] == pytest.approx(calibrated["record"]["offsets"], abs=1e-4)


def test_streaming_mode(setup, calibrated, tmp_path, monkeypatch):
    out = tmp_path / "stream.pth"
    assert _calibrate(setup, out, "--split", "test", "--mode", "streaming", "--max-sweeps", "3") == 0
    record = json.loads((tmp_path / "offsets.json").read_text())
    # The k-fold estimate runs in streaming mode too (issue 22): k streaming fits + one scoring pass.
    assert record["mode"] == "streaming" and record["cv"]["mode"] == "streaming" and "gain" in record["cv"]
    assert record["reward_before"] == pytest.approx(calibrated["record"]["reward_before"], abs=1e-12)
    assert record["reward_after"] > record["reward_before"]
    _, after = _mmseg_test(setup["config"], out, tmp_path / "after", monkeypatch)
    assert after == pytest.approx(100 * record["reward_after"], abs=1e-3)


def test_refuses_to_overwrite_and_never_writes_onto_the_input(setup, tmp_path, capsys):
    out = tmp_path / "cal.pth"
    assert _calibrate(setup, out, "--kfold", "0") == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert _calibrate(setup, out, "--kfold", "0") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: --out") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == first
    # offsets.json of another calibration in the same folder is not replaced silently either.
    assert _calibrate(setup, tmp_path / "other.pth", "--kfold", "0") == 2
    assert "offsets.json" in capsys.readouterr().err and not (tmp_path / "other.pth").exists()
    # Never onto the input checkpoint, even with --overwrite.
    original = setup["checkpoint"].read_bytes()
    assert _calibrate(setup, setup["checkpoint"], "--overwrite", "--kfold", "0") == 2
    assert "input" in capsys.readouterr().err
    assert setup["checkpoint"].read_bytes() == original
    assert _calibrate(setup, out, "--overwrite", "--kfold", "0", "--reward", "dice") == 0
    assert json.loads((tmp_path / "offsets.json").read_text())["reward"] == "dice"
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".cal.pth*"))


def _bad_checkpoint(setup, path: Path, edit) -> Path:
    state = {k: v.clone() for k, v in setup["state"].items()}
    edit(state)
    torch.save({"state_dict": state, "meta": {}}, path)
    return path


@pytest.mark.parametrize("case,needle", [
    ("no_config", "config file not found"),
    ("no_checkpoint", "checkpoint file not found"),
    ("checkpoint_classes", "has 5 classes (decode_head.conv_seg.weight) but the config's decode head has "
                           "num_classes=4"),
    ("dataset_classes", "predicts 4 classes but the test_dataloader dataset has 3 (a, b, c)"),
    ("no_bias", "has no bias to hold the offsets"),
    ("reward", "unknown reward 'boundary_f1'; count rewards"),
    ("kfold", "--kfold must be 0 (off) or >= 2"),
])
def test_one_line_errors(setup, tmp_path, capsys, case, needle):
    config, checkpoint, extra = str(setup["config"]), str(setup["checkpoint"]), ["--split", "test"]
    if case == "no_config":
        config = str(tmp_path / "missing.py")
    elif case == "no_checkpoint":
        checkpoint = str(tmp_path / "missing.pth")
    elif case == "checkpoint_classes":
        def five(state):
            state["decode_head.conv_seg.weight"] = torch.randn(5, *state["decode_head.conv_seg.weight"].shape[1:])
            state["decode_head.conv_seg.bias"] = torch.zeros(5)
        checkpoint = str(_bad_checkpoint(setup, tmp_path / "five.pth", five))
    elif case == "dataset_classes":
        extra += ["--cfg-options", "test_dataloader.dataset.metainfo.classes=(a,b,c)"]
    elif case == "no_bias":
        checkpoint = str(_bad_checkpoint(setup, tmp_path / "nobias.pth",
                                         lambda s: s.pop("decode_head.conv_seg.bias")))
    elif case == "reward":
        extra += ["--reward", "boundary_f1"]
    elif case == "kfold":
        extra += ["--kfold", "1"]
    out = tmp_path / "out" / "cal.pth"
    code = main([config, checkpoint, "--out", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"{PROG}: error: ") and len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists() and not (out.parent / "offsets.json").exists() and not (tmp_path / "work").exists()


def test_rounding_level_ties_are_never_split(setup, tmp_path, capsys, monkeypatch):
    """Output stride 32 gives 1 x 1 logits per image, so an image's pixels differ only by the
    rounding of the bilinear upsampling. The fit treats such thresholds as one breakpoint, so the
    folded float32 checkpoint scores in mmseg's test loop exactly what the fit reported (and no
    warning is needed)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(setup["config"]))
    cfg.model.backbone.strides = (1, 2, 2, 2)
    cfg.dump(str(tmp_path / "coarse.py"))
    out = tmp_path / "cal.pth"
    assert main([str(tmp_path / "coarse.py"), str(setup["checkpoint"]), "--split", "test", "--kfold", "0",
                 "--out", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    assert "within float32 rounding of a tie" not in capsys.readouterr().out
    record = json.loads((tmp_path / "offsets.json").read_text())
    _, after = _mmseg_test(tmp_path / "coarse.py", out, tmp_path / "after", monkeypatch)
    assert after == pytest.approx(100 * record["reward_after"], abs=1e-3)


def test_docs_show_the_command():
    text = (Path(__file__).resolve().parents[1] / "docs" / "mmseg.md").read_text()
    assert "python -m segreward.mmseg.calibrate" in text and "tools/test.py" in text


def test_label_values_reach_the_fit_as_mmseg_loads_them(setup, tmp_path):
    """reduce_zero_label: the dataset maps 0 -> 255 and c -> c - 1; the fit sees those labels."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from PIL import Image

    from segreward.mmseg.calibrate import segmentor_batches

    cfg = Config.fromfile(str(setup["config"]))
    cfg.test_dataloader.dataset.reduce_zero_label = True
    init_default_scope("mmseg")
    loader = Runner.build_dataloader(split_dataloader_cfg(cfg, "test"))
    model = _build_model(cfg.model)
    model.load_state_dict(setup["state"])
    labels = [y for _, y in segmentor_batches(model, loader)()]
    raw = [np.array(Image.open(p))
           for p in sorted((setup["tmp"] / "data" / "ann_dir" / "train").glob("*.png"))]
    for y, r in zip(labels, raw):
        expected = np.where((r == 0) | (r == 255), 255, r.astype(np.int64) - 1)
        np.testing.assert_array_equal(y[0].numpy(), expected)
