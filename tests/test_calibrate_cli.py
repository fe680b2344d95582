"""`segreward calibrate` end to end: a run directory in, offsets.json and folded weights out,
and the folded model scores what the fit reported."""

from __future__ import annotations

import json

import pytest
import torch

from segreward.cli import main
from segreward.engine import config_from_dict, train
from segreward.engine.builders import build_data
from segreward.engine.trainer import evaluate
from segreward.models import load_model

DUSK = {"type": "synthetic", "style": "dusk", "n": 6, "split": "val", "size": [32, 32]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("cal") / "run"
    cfg = config_from_dict({"name": "t", "work_dir": str(work), "model": {"name": "unet", "options": {"width": 8}},
                            "data": {"train": {"type": "synthetic", "style": "day", "n": 8, "size": [32, 32]},
                                     "val": {"val": DUSK}},
                            "train": {"iters": 6, "batch_size": 4, "eval_every": 6, "progress": False},
                            "optim": {"lr": 0.01}})
    train(cfg)
    return work


def test_calibrate_a_run_and_score_the_folded_model(run_dir, tmp_path, capsys):
    spec = tmp_path / "dusk.yaml"
    spec.write_text(json.dumps(DUSK))
    out = tmp_path / "cal"
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--kfold", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3-fold estimate" in printed and "IoU before" in printed
    record = json.loads((out / "offsets.json").read_text())
    assert len(record["offsets"]) == len(record["classes"]) and abs(sum(record["offsets"])) < 1e-9
    assert record["reward_after"] >= record["reward_before"]
    model = load_model(out / "model.safetensors")
    scores = evaluate(model, build_data(DUSK), len(record["offsets"]))
    assert scores["mIoU"] == pytest.approx(100 * record["reward_after"], abs=1e-3)
    before = evaluate(load_model(run_dir / "model.safetensors"), build_data(DUSK), len(record["offsets"]))
    assert before["mIoU"] == pytest.approx(100 * record["reward_before"], abs=1e-3)


def test_calibrate_never_overwrites_without_asking(run_dir, tmp_path, capsys):
    spec = tmp_path / "dusk.yaml"
    spec.write_text(json.dumps(DUSK))
    out = tmp_path / "cal"
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--kfold", "0", "--no-progress"]) == 0
    before = (out / "offsets.json").read_bytes()
    capsys.readouterr()
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "offsets.json").read_bytes() == before
    # Never onto the input weights.
    weights = (run_dir / "model.safetensors").read_bytes()
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(run_dir), "--overwrite", "--no-progress"]) == 2
    assert "input" in capsys.readouterr().err
    assert (run_dir / "model.safetensors").read_bytes() == weights
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--overwrite", "--mode", "streaming",
                 "--no-progress"]) == 0
    assert json.loads((out / "offsets.json").read_text())["mode"] == "streaming"


@pytest.mark.parametrize("args,needle", [
    (["{run}/nope", "{spec}"], "no such run directory"),
    (["{tmp}", "{spec}"], "no model.safetensors"),
    (["{run}", "{tmp}/missing.yaml"], "not found"),
    (["{run}", "{spec}", "--reward", "bogus"], "bogus"),
    (["{run}", "{spec}", "--kfold", "1"], "--kfold"),
    (["{run}", "{spec}", "--device", "gpu0"], "gpu0"),
    (["{run}", "{spec8}"], "num_classes"),
])
def test_bad_calibrate_input_is_one_line(run_dir, tmp_path, capsys, five_class_spec, args, needle):
    spec = tmp_path / "dusk.yaml"
    spec.write_text(json.dumps(DUSK))
    argv = [a.format(run=run_dir, spec=spec, tmp=tmp_path, spec8=five_class_spec) for a in args]
    assert main(["calibrate", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "offsets.json").exists()


def test_trainer_calibrate_step(tmp_path):
    """`calibrate.enabled` after a stage: offsets fitted on a val set, folded weights written next
    to the run's own, the calibrated scores in summary.json and the run log."""
    work = tmp_path / "run"
    cfg = config_from_dict({"name": "t", "work_dir": str(work), "model": {"name": "unet", "options": {"width": 8}},
                            "data": {"train": {"type": "synthetic", "style": "day", "n": 8, "size": [32, 32]},
                                     "val": {"dusk": DUSK}},
                            "train": {"iters": 4, "batch_size": 4, "eval_every": 4, "progress": False},
                            "calibrate": {"enabled": True, "data": "dusk", "kfold": 3}})
    result = train(cfg)
    cal = result["calibration"]
    assert result["val_calibrated"]["dusk"]["mIoU"] == pytest.approx(100 * cal.reward_after, abs=1e-3)
    assert result["val"]["dusk"]["mIoU"] == pytest.approx(100 * cal.reward_before, abs=1e-3)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["val_calibrated"]["dusk"]["mIoU"] >= summary["val"]["dusk"]["mIoU"]
    assert summary["calibration"]["cv"]["k"] == 3
    data = json.loads((work / "offsets.json").read_text())["data"]
    assert data["set"] == "dusk" and data["spec"] == DUSK and data["images"] == 6 and data["labelled_pixels"] > 0
    assert summary["calibration"]["data"] == data
    uncalibrated = load_model(work / "model.safetensors").eval()
    calibrated = load_model(work / "model_calibrated.safetensors").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = (uncalibrated(x) + torch.tensor(summary["calibration"]["offsets"]).view(1, -1, 1, 1)).argmax(1)
        assert torch.equal(calibrated(x).argmax(1), want)
    lines = [json.loads(line) for line in (work / "vis_data" / "scalars.json").read_text().splitlines()]
    assert any("calibrated/mIoU" in line for line in lines)


@pytest.mark.parametrize("section,needle", [
    ({"data": "nope"}, "no such set"),
    ({"reward": "bogus"}, "bogus"),
    ({"mode": "fast"}, "calibrate.mode"),
    ({"kfold": 1}, "calibrate.kfold"),
    ({"data": 3}, "calibrate.data"),
])
def test_trainer_calibrate_settings_fail_before_any_write(tmp_path, section, needle):
    from segreward.errors import SegrewardError
    work = tmp_path / "run"
    with pytest.raises(SegrewardError, match=needle):
        cfg = config_from_dict({"work_dir": str(work), "data": {"train": {"type": "synthetic", "n": 4,
                                                                          "size": [32, 32]}, "val": {}},
                                "train": {"iters": 2, "batch_size": 2, "progress": False},
                                "calibrate": {"enabled": True, **section}})
        train(cfg)
    assert not work.exists()


def test_calibrate_says_what_data_it_used(run_dir, tmp_path, capsys):
    """A dataset spec: named in offsets.json and the summary, no warning. A run config: its
    evaluation set is used, and a warning says so."""
    spec = tmp_path / "dusk.yaml"
    spec.write_text(json.dumps(DUSK))
    out = tmp_path / "cal"
    assert main(["calibrate", str(run_dir), str(spec), "--out", str(out), "--kfold", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert f"fitted on {spec} (dataset spec, type synthetic, split val): 6 images, " in captured.out
    data = json.loads((out / "offsets.json").read_text())["data"]
    assert data["spec"] == DUSK and data["images"] == 6 and data["kind"] == "dataset spec"
    assert data["labelled_pixels"] == int((build_data(DUSK).labels != 255).sum())
    assert f"{data['labelled_pixels']:,} labelled pixels" in captured.out
    assert main(["calibrate", str(run_dir), str(run_dir / "config.yaml"), "--out", str(tmp_path / "cal2"),
                 "--kfold", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "data.val.val" in captured.err and "in-sample" in captured.err
    data = json.loads((tmp_path / "cal2" / "offsets.json").read_text())["data"]
    assert data["kind"] == "run config" and data["set"] == "val" and data["spec"] == DUSK


def test_the_example_dataset_specs_load(tmp_path, monkeypatch):
    """configs/data/*.yaml as the README shows them: the synthetic ones build as they are, the
    folder one on a folder laid out where it says."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from segreward.engine.resolve import resolve_data
    configs = Path(__file__).resolve().parents[1] / "configs" / "data"
    for name, n in (("synthetic_dusk_val.yaml", 64), ("synthetic_dusk_labelled.yaml", 32)):
        choice = resolve_data(configs / name)
        assert len(choice.dataset) == n and choice.dataset[0][1].shape == (64, 128)
    monkeypatch.chdir(tmp_path)
    for sub in ("img_dir/val", "ann_dir/val"):
        (tmp_path / "data" / "my_target" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data/my_target/img_dir/val/a.jpg")
    Image.fromarray(np.full((8, 8), 4, np.uint8)).save(tmp_path / "data/my_target/ann_dir/val/a.png")
    choice = resolve_data(configs / "folder_example.yaml")
    assert len(choice.dataset) == 1 and len(choice.dataset.meta.classes) == 7
    assert choice.info["spec"]["root"] == "data/my_target"


def test_the_readme_shows_the_example_specs_as_they_are():
    """Each ```yaml block of the README headed `# configs/data/NAME` parses to that file's content."""
    import re
    from pathlib import Path

    import yaml
    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```yaml\n# (configs/data/[\w.]+):.*?\n(.*?)```", (root / "README.md").read_text(), re.S)
    assert {name for name, _ in blocks} == {"configs/data/synthetic_dusk_labelled.yaml",
                                            "configs/data/folder_example.yaml"}
    for name, body in blocks:
        assert yaml.safe_load(body) == yaml.safe_load((root / name).read_text()), name
