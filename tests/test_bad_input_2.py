"""Bad input, round two (issue 19): data loss, silently wrong results, tracebacks, misleading
messages and litter, one parametrised case per kind, through the harness of
:mod:`test_bad_input` (one line, exit 2 / SegrewardError, nothing of the earlier outputs changed),
then behaviours that must succeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from segreward.cli import main
from segreward.errors import SegrewardError
from test_bad_input import SRC, Case, base, run_case, tiny, write_yaml  # noqa: F401 (base: the fixture)

CASES: list = []


def case(group: str, name: str, *needles):
    def deco(fn):
        CASES.append(pytest.param(Case(f"{group}:{name}", fn, needles), id=f"{group}:{name}"))
        return fn
    return deco


def lib(group: str, name: str, *needles):
    def deco(fn):
        CASES.append(pytest.param(Case(f"{group}:{name}", lambda b, t: (lambda: fn(b, t)), needles),
                                  id=f"{group}:{name}"))
        return fn
    return deco


@pytest.mark.parametrize("c", CASES)
def test_bad_input_round_two(c, base, tmp_path, capsys):  # noqa: F811
    run_case(c, base, tmp_path, capsys)


def _copy_run(base, tmp):
    shutil.copytree(base / "run", tmp / "w")
    return tmp / "w"


def _cfg(tmp, **extra):
    return write_yaml(tmp / "c.yaml", tiny(tmp / "w", **extra))


# ------------------------------------------------------------------ 1. data loss

@case("loss", "overwrite-config-is-run-config", "would replace", "config file")
def _(base, tmp):
    w = _copy_run(base, tmp)
    return ["train", w / "config.yaml", "--work-dir", w, "--overwrite", "train.iters=3"]


@case("loss", "overwrite-checkpoint-in-run", "would remove", "model.checkpoint")
def _(base, tmp):
    w = _copy_run(base, tmp)
    return ["train", _cfg(tmp), "--overwrite", f"model.checkpoint={w / 'model.safetensors'}"]


@case("loss", "demo-out-onto-own-files", "did not write", "notes.txt")
def _(base, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine\n")
    return ["demo", "--quick", "--out", tmp / "mine", "--no-progress"]


# ------------------------------------------------------------------ 2. silently wrong

@case("wrong", "lr-inf", "optim.lr", "finite")
def _(base, tmp):
    return ["train", _cfg(tmp), "optim.lr=.inf"]


def _resume_changed(name, override, needle):
    def make(base, tmp):
        w = _copy_run(base, tmp)
        return ["train", w / "config.yaml", "--work-dir", w, "--resume", override]
    CASES.append(pytest.param(Case(f"wrong:resume-other-{name}", make, ("changed config", needle)),
                              id=f"wrong:resume-other-{name}"))


_resume_changed("lr", "optim.lr=0.01", "optim.lr: 0.001 -> 0.01")
_resume_changed("data", "data.train.seed=2", "data.train.seed: 1 -> 2")
_resume_changed("seed", "seed=3", "seed: 0 -> 3")
_resume_changed("size", "data.train.size=[16,32]", "data.train.size")
_resume_changed("schedule-length", "train.iters=4", "train.iters: 2 -> 4")


@case("wrong", "name-outside-runs", "name = '../x'", "work_dir")
def _(base, tmp):
    cfg = tiny(tmp / "w")
    del cfg["work_dir"]
    return ["train", write_yaml(tmp / "c.yaml", cfg), "name=../x"]


@case("wrong", "calibrate-zero-class-weights", "all 0")
def _(base, tmp):
    (tmp / "weights.json").write_text(json.dumps({"weights": [0.0] * 8}))
    return ["calibrate", base / "run", base / "tiny.yaml", "--reward", "weighted_miou", "--class-weights",
            tmp / "weights.json", "--out", tmp / "cal", "--no-progress", "--kfold", "0"]


@lib("wrong", "fit-offsets-zero-class-weights", "all 0")
def _(base, tmp):
    from segreward.calibrate import fit_offsets
    fit_offsets(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), reward="weighted_miou",
                class_weights=[0, 0, 0])


@case("wrong", "plot-trend-nan", "--trend", "finite")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.png", "--trend", "0,nan,10,50"]


@lib("wrong", "metric-class-names-length", "2 names", "num_classes=3")
def _(base, tmp):
    from segreward.metrics import SegMetric
    SegMetric(3, class_names=["a", "b"])


# ------------------------------------------------------------------ 3. tracebacks

def _not_a_checkpoint(kind):
    def write(tmp):
        path = tmp / f"x.{'yaml' if kind == 'yaml' else 'pt'}"
        if kind == "tensor":
            torch.save(torch.zeros(3), path)
        elif kind == "text":
            path.write_text("hello\n")
        elif kind == "yaml":
            path.write_text("lr: 3e-3\n")
        else:
            path.mkdir()
        return path
    return write


for _kind in ("tensor", "text", "yaml", "folder"):
    def _start(base, tmp, write=_not_a_checkpoint(_kind)):
        return ["train", _cfg(tmp), f"model.checkpoint={write(tmp)}"]
    CASES.append(pytest.param(Case(f"trace:start-weights-{_kind}", _start, ("not a checkpoint",)),
                              id=f"trace:start-weights-{_kind}"))
    if _kind != "folder":  # a folder is a run directory to calibrate: its own message
        def _cal(base, tmp, write=_not_a_checkpoint(_kind)):
            return ["calibrate", write(tmp), base / "tiny.yaml", "--out", tmp / "cal"]
        CASES.append(pytest.param(Case(f"trace:calibrate-{_kind}", _cal, ("not a checkpoint",)),
                                  id=f"trace:calibrate-{_kind}"))


@case("trace", "resume-from-model-weights", "not a checkpoint", "model.checkpoint=")
def _(base, tmp):
    w = _copy_run(base, tmp)
    shutil.copy(w / "model.safetensors", w / "checkpoints" / "last.pt")
    return ["train", w / "config.yaml", "--work-dir", w, "--resume"]


@case("trace", "calibrate-batch-size-0", "--batch-size", "0")
def _(base, tmp):
    return ["calibrate", base / "run", base / "tiny.yaml", "--batch-size", "0", "--out", tmp / "cal"]


@case("trace", "calibrate-device-meta", "'meta'", "not a device")
def _(base, tmp):
    return ["calibrate", base / "run", base / "tiny.yaml", "--device", "meta", "--out", tmp / "cal"]


if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
    @case("trace", "train-device-mps-absent", "'mps'", "not available")
    def _(base, tmp):
        return ["train", _cfg(tmp), "train.device=mps"]


L, Y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))


@lib("trace", "metric-numpy", "torch tensors", "torch.from_numpy")
def _(base, tmp):
    from segreward.metrics import SegMetric
    SegMetric(3).update(Y.numpy(), Y.numpy())


@lib("trace", "fit-offsets-numpy", "torch tensors")
def _(base, tmp):
    from segreward.calibrate import fit_offsets
    fit_offsets(L.numpy(), Y.numpy())


@lib("trace", "metric-empty-batch", "empty batch")
def _(base, tmp):
    from segreward.metrics import SegMetric
    SegMetric(3).update(torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.long))


@lib("trace", "reward-wrong-signature", "(pred, target)")
def _(base, tmp):
    from segreward import ReinforceLoss
    ReinforceLoss(3, k=2, reward=lambda pred: pred.float().mean())


def _stream(name, passes, *needles):
    def fn():
        from segreward.calibrate import fit_offsets_streaming
        fit_offsets_streaming(passes(), 3, max_sweeps=3)
    CASES.append(pytest.param(Case(f"trace:stream-{name}", lambda b, t: fn, needles), id=f"trace:stream-{name}"))


_stream("list", lambda: [(L, Y)], "got a list", "lambda")
_stream("generator", lambda: ((L, Y) for _ in range(1)), "got a generator")
_stream("exhausted-iterator", lambda: (lambda it=iter([(L, Y)]): it), "no batches", "fresh iterable")
_stream("not-pairs", lambda: (lambda: [(L, Y, Y)]), "(logits [B, C, H, W], labels [B, H, W]) pair")


@lib("trace", "fold-offsets-string", "not numbers")
def _(base, tmp):
    from segreward.calibrate.folding import fold_offsets
    from segreward.models import build_model
    fold_offsets(build_model("unet", 3, width=4), "0,1,2")


@lib("trace", "fold-offsets-none", "not numbers")
def _(base, tmp):
    from segreward.calibrate.folding import fold_offsets
    from segreward.models import build_model
    fold_offsets(build_model("unet", 3, width=4), None)


# ------------------------------------------------------------------ 4. misleading

@case("msg", "unknown-dataset-type-no-root", "unknown dataset type 'nope'")
def _(base, tmp):
    return ["train", _cfg(tmp), "data.train={type: nope}"]


@lib("msg", "stream-no-batches", "no batches")
def _(base, tmp):
    from segreward.calibrate import fit_offsets_streaming
    fit_offsets_streaming(lambda: [], 3)


@lib("msg", "not-a-reward", "is not a reward")
def _(base, tmp):
    from segreward.calibrate import fit_offsets
    fit_offsets(L, Y, reward=3)


@case("msg", "calibrate-mmseg-folder-classes", "--classes")
def _(base, tmp):
    for d in ("img_dir/val", "ann_dir/val"):
        (tmp / "mm" / d).mkdir(parents=True)
    # a folder's classes come from --classes (else from the model): a malformed value names the option
    return ["calibrate", base / "run", tmp / "mm", "--classes", "road", "--out", tmp / "cal"]


@case("msg", "train-no-arguments", "required: CONFIG")
def _(base, tmp):
    return ["train"]


# ------------------------------------------------------------------ behaviours that must succeed

def test_there_are_cases_of_every_class():
    groups = {p.values[0].id.split(":")[0] for p in CASES}
    assert groups == {"loss", "wrong", "trace", "msg"} and len(CASES) >= 40


def test_scientific_notation_is_a_number(tmp_path):
    from segreward.engine import config_from_dict, load_config
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-3\n  weight_decay: 1E-5\n")
    cfg = load_config(tmp_path / "c.yaml", ["loss.temperature=2e0", "optim.grad_clip=1e+1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.temperature, cfg.optim.grad_clip) == (3e-3, 1e-5, 2.0, 10.0)
    assert config_from_dict({}, ["optim.lr=1e-4"]).optim.lr == 1e-4  # the example of `segreward train --help`


def test_train_no_arguments_names_only_config(capsys):
    with pytest.raises(SystemExit):
        main(["train"])
    err = capsys.readouterr().err
    assert "CONFIG" in err.splitlines()[-1] and "KEY=VALUE" not in err.splitlines()[-1]


class _FailingVal(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        raise SegrewardError("val image unreadable")


@pytest.mark.parametrize("checkpoint_every", [2, 3])  # due with the evaluation, or not
def test_a_failed_evaluation_keeps_the_steps(tmp_path, checkpoint_every):
    from segreward.engine import config_from_dict, train
    from segreward.engine.builders import build_data
    cfg = tiny(tmp_path / "w", **{"train.iters": 3, "train.eval_every": 2, "train.checkpoint_every": checkpoint_every})
    val = _FailingVal(build_data(cfg["data"]["val"]["val"]))
    with pytest.raises(SegrewardError, match="unreadable"):
        train(config_from_dict(cfg), datasets={"val": {"val": val}})
    assert torch.load(tmp_path / "w" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_a_failed_final_evaluation_resumes_to_the_end(tmp_path):
    from segreward.engine import config_from_dict, train
    from segreward.engine.builders import build_data
    cfg = tiny(tmp_path / "w")
    good = build_data(cfg["data"]["val"]["val"])
    with pytest.raises(SegrewardError):
        train(config_from_dict(cfg), datasets={"val": {"val": _FailingVal(good)}})
    result = train(config_from_dict(cfg), resume=True, datasets={"val": {"val": good}})
    assert result["step"] == 2 and result["val"]["val"]["mIoU"] >= 0 and (tmp_path / "w" / "model.safetensors").exists()


def test_non_finite_weights_stop_the_run(tmp_path, monkeypatch):
    from segreward.engine import config_from_dict, train, trainer
    step = trainer._Stage._optimizer_step

    def poisoned(self):
        lr = step(self)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return lr

    monkeypatch.setattr(trainer._Stage, "_optimizer_step", poisoned)
    with pytest.raises(SegrewardError, match="weights became NaN"):
        train(config_from_dict(tiny(tmp_path / "w", **{"train.iters": 1})))
    assert not (tmp_path / "w" / "model.safetensors").exists() and not (tmp_path / "w" / "checkpoints").exists()


def test_resume_applies_logging_changes_and_records_them(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "w", **{"train.iters": 2, "train.checkpoint_every": 1,
                                                                   "optim.schedule": "constant"}))
    assert main(["train", str(cfg), "train.iters=1"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "train.eval_every=1"]) == 0  # iters 1 -> 2: constant schedule
    err = capsys.readouterr().err
    assert "applies and records" in err and "train.eval_every: 2 -> 1" in err and "train.iters: 1 -> 2" in err
    saved = yaml.safe_load((tmp_path / "w" / "config.yaml").read_text())
    assert saved["train"]["eval_every"] == 1 and saved["train"]["iters"] == 2


def test_overwrite_removes_an_old_calibration(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "w"))
    assert main(["train", str(cfg)]) == 0
    assert main(["calibrate", str(tmp_path / "w"), str(cfg), "--kfold", "0", "--no-progress"]) == 0
    assert (tmp_path / "w" / "calibrated").is_dir()
    assert main(["train", str(cfg), "--overwrite"]) == 0
    assert not (tmp_path / "w" / "calibrated").exists()


def test_data_val_empty_mapping_removes_the_val_sets():
    from segreward.engine import config_from_dict
    assert config_from_dict({}, ["data.val={}"]).data.val == {}


def test_local_estimator_is_finite_where_a_class_is_masked():
    from segreward import ReinforceLoss
    logits = torch.randn(2, 3, 4, 4)
    logits[:, 2] = -float("inf")
    logits.requires_grad_()
    target = torch.randint(0, 2, (2, 4, 4))
    for scope in ("image", "batch"):
        loss = ReinforceLoss(3, estimator="local", scope=scope, k=2)(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert torch.isfinite(torch.nn.functional.cross_entropy(logits, target))


def test_stats_freq_into_the_counted_folder_skips_its_own_plot(base, tmp_path, capsys):  # noqa: F811
    ann = tmp_path / "ann"
    shutil.copytree(base / "ann", ann)
    for _ in range(2):
        assert main(["stats", "freq", str(ann), "--out", str(ann), "--plot", "--no-progress"]) == 0
        counts = json.loads((ann / "frequencies.json").read_text())["counts"]
    assert sum(counts) == 3 * 8 * 8


def test_failed_commands_leave_no_empty_folder(base, tmp_path, capsys):  # noqa: F811
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "new" / "w", **{"optim": {"name": "sgd", "lr": 1e30},
                                                                           "train.log_every": 10}))
    assert main(["train", str(cfg)]) == 2
    assert main(["stats", "freq", str(tmp_path / "nothere"), "--out", str(tmp_path / "o1" / "o2")]) == 2
    assert main(["calibrate", str(base / "run"), str(base / "tiny.yaml"), "--batch-size", "0",
                 "--out", str(tmp_path / "o3")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_ctrl_c_while_starting_is_one_line(base, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen([sys.executable, "-m", "segreward", "train", str(base / "tiny.yaml")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.strip().splitlines() == ["segreward: interrupted"]
