"""Trainer: smoke runs, the mmengine log format, resume after a kill, DDP (gloo) vs one
process, pseudo-labels, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from segreward.cli import main
from segreward.engine import config_from_dict, train
from segreward.models import build_model, read_state_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_config(work_dir, **extra):
    cfg = {
        "name": "tiny",
        "work_dir": str(work_dir),
        "seed": 3,
        "data": {
            "train": {"type": "synthetic", "style": "day", "n": 16, "seed": 1, "size": [32, 48]},
            "val": {"dusk": {"type": "synthetic", "style": "dusk", "n": 6, "seed": 1, "size": [32, 48], "split": "val"},
                    "day": {"type": "synthetic", "style": "day", "n": 6, "seed": 1, "size": [32, 48], "split": "val"}},
        },
        "model": {"name": "unet", "options": {"width": 8}},
        "optim": {"lr": 0.01},
        "train": {"iters": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "log_every": 2,
                  "progress": False},
    }
    for key, value in extra.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def read_jsonl(path):
    """A reference JSON-lines reader: every line one JSON object."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def weights(path):
    return read_state_dict(path)[0]


def test_pretrain_then_tune_changes_parameters_and_logs_mmengine_format(tmp_path):
    result = train(config_from_dict(tiny_config(tmp_path / "pre")))
    assert set(result["val"]) == {"dusk", "day"}
    torch.manual_seed(3)
    init = build_model("unet", 8, width=8).state_dict()
    trained = weights(tmp_path / "pre" / "model.safetensors")
    assert any(not torch.equal(init[k], trained[k]) for k in init)

    lines = read_jsonl(tmp_path / "pre" / "vis_data" / "scalars.json")
    train_lines = [x for x in lines if "loss" in x]
    val_lines = [x for x in lines if "mIoU" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6]
    assert {"lr", "loss", "loss_ce", "time", "data_time", "iter", "step"} <= set(train_lines[0])
    assert [x["step"] for x in val_lines] == [3, 6]
    assert {"aAcc", "mIoU", "mAcc", "mDice", "day/mIoU", "step"} <= set(val_lines[0])
    assert not any("loss" in k for k in val_lines[0])
    assert (tmp_path / "pre" / "config.yaml").exists()

    cfg = tiny_config(tmp_path / "tune", stage="tune", **{"model.checkpoint": str(tmp_path / "pre" / "model.safetensors"),
                                                           "loss": {"estimator": "sample", "k": 3, "ce_weight": 0.1}})
    train(config_from_dict(cfg))
    tuned = weights(tmp_path / "tune" / "model.safetensors")
    assert any(not torch.equal(trained[k], tuned[k]) for k in trained)
    tune_lines = [x for x in read_jsonl(tmp_path / "tune" / "vis_data" / "scalars.json") if "loss" in x]
    for line in tune_lines:
        assert torch.isfinite(torch.tensor(line["loss_reinforce"]))
        assert {"reward_mean", "reward_std", "adv_std", "greedy_reward", "entropy"} <= set(line)


def test_pseudo_label_tuning_runs_without_labels(tmp_path):
    train(config_from_dict(tiny_config(tmp_path / "pre", **{"train.iters": 3})))
    cfg = tiny_config(tmp_path / "uda", stage="tune", pseudo_label={"enabled": True, "threshold": 0.2},
                      **{"model.checkpoint": str(tmp_path / "pre" / "model.safetensors"), "train.iters": 2})
    train(config_from_dict(cfg))
    lines = [x for x in read_jsonl(tmp_path / "uda" / "vis_data" / "scalars.json") if "loss" in x]
    assert 0 < lines[-1]["pseudo_fraction"] <= 1


def test_semi_supervised_pseudo_labels_fill_only_the_frames_without_labels():
    """pseudo_label.only_unlabelled: a frame with any labelled pixel keeps its labels (its ignored
    pixels stay ignored); a frame without one gets the teacher's confident argmax."""
    from types import SimpleNamespace

    from segreward.engine.config import PseudoLabelConfig
    from segreward.engine.trainer import _Stage
    from segreward.errors import SegrewardError
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(3, 3, 5, 6)
    y = torch.full((3, 5, 6), 255)
    y[0] = torch.randint(0, 4, (5, 6))
    y[0, 0, 0] = 255
    y[2, 1, 2] = 3  # one labelled pixel: a labelled frame
    cfg = SimpleNamespace(pseudo_label=PseudoLabelConfig(enabled=True, only_unlabelled=True, threshold=0.3))
    out = _Stage._pseudo(SimpleNamespace(cfg=cfg, teacher=teacher, ignore_index=255), x, y.clone())
    assert torch.equal(out[0], y[0]) and torch.equal(out[2], y[2])
    prob = torch.softmax(teacher(x[1:2]), 1)[0]  # independent reference: softmax, max, threshold
    want = torch.where(prob.max(0).values >= 0.3, prob.argmax(0), torch.full((5, 6), 255))
    assert torch.equal(out[1], want) and (want != 255).any() and (want == 255).any()
    cfg.pseudo_label.only_unlabelled = False  # uda: every frame's labels are replaced
    every = _Stage._pseudo(SimpleNamespace(cfg=cfg, teacher=teacher, ignore_index=255), x, y.clone())
    assert not torch.equal(every[0], y[0])
    with pytest.raises(SegrewardError, match="only_unlabelled=true needs pseudo_label.enabled"):
        PseudoLabelConfig(only_unlabelled=True)


def _write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _segreward(*args, **kw):
    return subprocess.run([sys.executable, "-m", "segreward", *args], env=_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def kill_after_first_checkpoint(cfg_path, work_dir):
    """Start ``segreward train cfg_path``, SIGKILL it once its first checkpoint exists; return that path."""
    proc = subprocess.Popen([sys.executable, "-m", "segreward", "train", str(cfg_path)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = work_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return ckpt


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    # Every run is a single-threaded subprocess, so float reductions happen in the same order.
    common = {"train.iters": 24, "train.checkpoint_every": 4, "train.eval_every": 24, "loss": {"type": "reinforce", "k": 2},
              "stage": "tune", "train.progress": False}
    ref = _segreward("train", str(_write_config(tmp_path / "ref.yaml", tiny_config(tmp_path / "ref", **common))))
    assert ref.returncode == 0, ref.stderr[-2000:]

    cfg_path = _write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", **common))
    ckpt = kill_after_first_checkpoint(cfg_path, tmp_path / "run")
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 24
    resumed = _segreward("train", str(cfg_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "ref" / "model.safetensors"), weights(tmp_path / "run" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the log holds every step once the reader keeps the last line per step
    steps = {x["step"] for x in read_jsonl(tmp_path / "run" / "vis_data" / "scalars.json") if "loss" in x}
    assert steps == set(range(2, 25, 2))


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    # SGD, not Adam: Adam divides by sqrt(v), which turns float-rounding differences of
    # near-zero gradients into visible weight differences.
    common = {"train.augment": False, "model.options": {"width": 8, "dropout": 0.0}, "train.iters": 4,
              "train.eval_every": 4, "train.checkpoint_every": 4, "optim": {"name": "sgd", "lr": 0.05}}
    one = train(config_from_dict(tiny_config(tmp_path / "one", **common)))
    cfg_path = _write_config(tmp_path / "ddp.yaml", tiny_config(tmp_path / "ddp", **common))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "segreward", "train", str(cfg_path)], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    for name in ("dusk", "day"):
        assert summary["val"][name]["mIoU"] == pytest.approx(one["val"][name]["mIoU"], abs=1e-3)
    a, b = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "ddp" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "nan", **{"optim": {"name": "sgd", "lr": 1e30, "schedule": "constant"},
                                           "train.checkpoint_every": 1, "train.iters": 10})
    code = main(["train", str(_write_config(tmp_path / "nan.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "the loss became" in err and "last good checkpoint" in err
    assert (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("change, message", [
    ({"loss": {"kk": 3}}, "unknown config key loss.kk; valid keys here: type, reward"),
    ({"optim": {"lr": "fast"}}, "optim.lr = 'fast' has type str; expected float"),
    ({"stage": "finetune"}, "stage = 'finetune' is not valid; choose one of: pretrain, tune"),
    ({"data.train": {"type": "synthetic", "n": 0}}, "empty"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, change, message):
    cfg = tiny_config(tmp_path / "bad", **change)
    code = main(["train", str(_write_config(tmp_path / "bad.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_checkpoint_for_other_num_classes_is_one_line_error(tmp_path, capsys):
    from segreward.models import save_weights
    save_weights(build_model("unet", 5, width=8), tmp_path / "five.safetensors")
    cfg = tiny_config(tmp_path / "bad", **{"model.checkpoint": str(tmp_path / "five.safetensors")})
    code = main(["train", str(_write_config(tmp_path / "bad.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "num_classes=5" in err and "num_classes=8" in err


def test_overrides_on_the_command_line(tmp_path):
    cfg_path = _write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "o"))
    assert main(["train", str(cfg_path), "train.iters=2", "train.eval_every=2", "loss.type=reward_weighted_ce"]) == 0
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["train"]["iters"] == 2 and saved["loss"]["type"] == "reward_weighted_ce"


def test_class_weights_json_and_concat_data(tmp_path):
    (tmp_path / "weights.json").write_text(json.dumps({"weights": [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 4.0, 1.0]}))
    parts = [{"type": "synthetic", "style": "day", "n": 4, "size": [32, 48]},
             {"type": "synthetic", "style": "dusk", "n": 4, "size": [32, 48]}]
    cfg = tiny_config(tmp_path / "cw", **{"loss.class_weight": str(tmp_path / "weights.json"), "train.iters": 2,
                                          "train.eval_every": 2, "data.train": {"type": "concat", "parts": parts}})
    assert train(config_from_dict(cfg))["step"] == 2
    (tmp_path / "bad.json").write_text("[1.0, 2.0]")
    cfg = tiny_config(tmp_path / "cw2", **{"loss.class_weight": str(tmp_path / "bad.json")})
    with pytest.raises(Exception, match="bad.json"):
        train(config_from_dict(cfg))


# ----------------------------------------------------------------------------- in-memory data, lovasz, KL anchor
def _memory_sets():
    from segreward.data.memory import InMemoryDataset
    from segreward.data.synthetic import SyntheticDataset
    train_set = InMemoryDataset.decode(SyntheticDataset("day", n=16, seed=1, size=(32, 48)))
    val = InMemoryDataset.decode(SyntheticDataset("dusk", n=6, seed=1, size=(32, 48), split="val"))
    return train_set, val


def test_in_memory_datasets_replace_the_config_data_and_get_the_augmentation(tmp_path, monkeypatch):
    from segreward.data.memory import InMemoryDataset
    train_set, val = _memory_sets()
    x, y = train_set[3]
    flipped = train_set.with_transform(lambda im, lb: (im[:, ::-1], lb[:, ::-1]))[3]
    assert torch.equal(flipped[0], x.flip(-1)) and torch.equal(flipped[1], y.flip(-1))
    seen = []
    real = InMemoryDataset.with_transform
    monkeypatch.setattr(InMemoryDataset, "with_transform", lambda self, t: seen.append(t) or real(self, t))
    cfg = tiny_config(tmp_path / "mem", **{"loss.type": "lovasz", "train.iters": 2, "train.eval_every": 2,
                                           "data.train": {"type": "synthetic", "n": 0}})  # would be empty: unused
    result = train(config_from_dict(cfg), datasets={"train": train_set, "val": {"dusk": val}})
    assert len(seen) == 1 and "RandomFlip" in repr(seen[0])
    assert set(result["val"]) == {"dusk"} and result["classes"] == list(train_set.classes)
    saved = yaml.safe_load((tmp_path / "mem" / "config.yaml").read_text())
    assert saved["data"]["train"] == {"type": "given (InMemoryDataset)", "n": 16}
    lines = [x for x in read_jsonl(tmp_path / "mem" / "vis_data" / "scalars.json") if "loss" in x]
    assert "loss_lovasz" in lines[-1] and 0 < lines[-1]["loss_lovasz"] <= 1
    with pytest.raises(Exception, match="unknown keys \\['test'\\]"):
        train(config_from_dict(cfg), datasets={"test": val})


def test_kl_to_reference_matches_torch_kl_div():
    from segreward.engine.trainer import kl_to_reference
    a, b = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    want = torch.nn.functional.kl_div(torch.log_softmax(a, 1), torch.log_softmax(b, 1), log_target=True,
                                      reduction="none").sum(1).mean()
    torch.testing.assert_close(kl_to_reference(a, b), want)
    assert float(kl_to_reference(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_kl_anchor_is_logged_and_a_resumed_run_keeps_its_reference(tmp_path):
    from segreward.models import save_weights
    train_set, val = _memory_sets()
    data = {"train": train_set, "val": {"dusk": val}}
    torch.manual_seed(0)
    start = tmp_path / "start.safetensors"
    save_weights(build_model("unet", 8, width=8, dropout=0.0), start)
    common = {"model": {"name": "unet", "options": {"width": 8, "dropout": 0.0}, "checkpoint": str(start)},
              "loss.kl_weight": 0.5, "optim": {"lr": 0.01, "schedule": "constant"}, "train.checkpoint_every": 2,
              "train.eval_every": 4, "train.log_every": 1}
    train(config_from_dict(tiny_config(tmp_path / "ref", **common, **{"train.iters": 4})), datasets=data)
    lines = [x for x in read_jsonl(tmp_path / "ref" / "vis_data" / "scalars.json") if "loss" in x]
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert all(x["kl"] > 0 for x in lines[1:])
    assert lines[-1]["loss"] == pytest.approx(lines[-1]["loss_ce"] + 0.5 * lines[-1]["kl"], rel=1e-5)

    train(config_from_dict(tiny_config(tmp_path / "run", **common, **{"train.iters": 2})), datasets=data)
    assert "reference" in torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    # Another file at model.checkpoint now: the resumed run must keep the reference it started with.
    save_weights(build_model("unet", 8, width=8, dropout=0.0), start)
    train(config_from_dict(tiny_config(tmp_path / "run", **common, **{"train.iters": 4})), resume=True, datasets=data)
    a, b = weights(tmp_path / "ref" / "model.safetensors"), weights(tmp_path / "run" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
