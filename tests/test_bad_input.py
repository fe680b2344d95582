"""Bad input, as a careless user gives it, across the CLI and the library (issue 15).

One parametrised case per kind, grouped by the class of failure it once had. Every case asserts:
exit code 2 (CLI) or :class:`SegrewardError` (library); one line that names the file or value;
no traceback; and no byte of an earlier output (a finished run, logs, frequencies) changed.
CLI cases run in-process through :func:`segreward.cli.main`; fixtures live in a temp folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segreward.cli import main
from segreward.errors import SegrewardError

SRC = str(Path(__file__).resolve().parents[1] / "src")
PENDING = "library validation pending"


def tiny(work_dir, **extra) -> dict:
    """A run that takes about a second: 4 synthetic images of 16x24, 2 iterations."""
    cfg = {
        "name": "tiny", "work_dir": str(work_dir), "seed": 0,
        "data": {"train": {"type": "synthetic", "style": "day", "n": 4, "seed": 1, "size": [16, 24]},
                 "val": {"val": {"type": "synthetic", "style": "day", "n": 2, "seed": 1, "size": [16, 24],
                                 "split": "val"}}},
        "model": {"name": "unet", "options": {"width": 4}},
        "train": {"iters": 2, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1,
                  "progress": False},
    }
    for key, value in extra.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Earlier outputs that no bad input may touch: a finished run, its config, label maps,
    frequencies.json, a log to plot."""
    root = tmp_path_factory.mktemp("bad_input")
    cfg = write_yaml(root / "tiny.yaml", tiny(root / "run"))
    assert main(["train", str(cfg)]) == 0
    ann = root / "ann"
    ann.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 3, (8, 8)).astype(np.uint8), "L").save(ann / f"{i}.png")
    assert main(["stats", "freq", str(ann), "--out", str(root / "freq"), "--no-progress"]) == 0
    (root / "afile").write_text("a regular file\n")
    return root


def _tree_digest(*roots: Path) -> dict:
    out = {}
    for r in roots:
        for p in sorted(Path(r).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    make: Callable  # (base, tmp) -> list of CLI args, or a zero-argument callable (library)
    needles: tuple = ()
    marks: tuple = field(default_factory=tuple)


CASES: list = []


def case(group: str, name: str, *needles, marks=()):
    def deco(fn):
        CASES.append(pytest.param(Case(f"{group}:{name}", fn, needles), id=f"{group}:{name}", marks=marks))
        return fn
    return deco


def cli_case(group, name, *needles, marks=()):
    return case(group, name, *needles, marks=marks)


def _train(base, tmp, *extra, cfg_extra=None, work=None):
    work = work or tmp / "w"
    cfg = write_yaml(tmp / "c.yaml", tiny(work, **(cfg_extra or {})))
    return ["train", str(cfg), *extra]


@pytest.mark.parametrize("c", CASES)
def test_bad_input(c: Case, base, tmp_path, capsys):
    run_case(c, base, tmp_path, capsys)


def run_case(c: Case, base, tmp_path, capsys) -> str:
    """Make the case, run it, check the one-line message, its needles and that nothing changed."""
    made = c.make(base, tmp_path)
    before = _tree_digest(base, tmp_path)
    capsys.readouterr()
    if callable(made):
        with pytest.raises(SegrewardError) as info:
            made()
        message = str(info.value)
        assert "\n" not in message.strip(), message
    else:
        try:
            code = main([str(a) for a in made])
        except SystemExit as e:  # argparse: usage line + one error line
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert "Traceback" not in err
        lines = err.splitlines()
        if lines and lines[0].startswith("usage:"):
            lines = [ln for ln in lines if ": error:" in ln]
        assert len(lines) == 1, err
        message = lines[0]
    for needle in c.needles:
        needle = needle.format(base=base, tmp=tmp_path)
        assert needle in message, f"{needle!r} not in {message!r}"
    after = _tree_digest(base, tmp_path)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"changed or removed: {changed}"
    return message


# ------------------------------------------------------------------ data loss: runs and inputs

@cli_case("loss", "train-into-existing-run", "{base}/run", "--resume", "--overwrite")
def _(base, tmp):
    return ["train", base / "tiny.yaml"]


@cli_case("loss", "train-work-dir-existing-run", "{base}/run", "already holds a run")
def _(base, tmp):
    return _train(base, tmp, "--work-dir", base / "run")


@cli_case("loss", "resume-and-overwrite", "--resume and --overwrite")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--resume", "--overwrite"]


@cli_case("loss", "existing-run-bad-data", "'nope'")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "data.train.type=nope", "data.train.root=" + str(tmp)]


@cli_case("loss", "overwrite-bad-data", "empty")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--overwrite", "data.train.n=0"]


@cli_case("loss", "overwrite-bad-config", "train.iters")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--overwrite", "train.iters=-1"]


@cli_case("loss", "overwrite-missing-checkpoint", "missing.safetensors")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--overwrite", f"model.checkpoint={tmp / 'missing.safetensors'}"]


@cli_case("loss", "resume-other-model-on-existing", "changed config", "model.options.width: 4 -> 8")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--resume", "train.iters=4", "model.options.width=8"]


@cli_case("loss", "resume-no-checkpoint-but-run-files", "no checkpoint", "--overwrite")
def _(base, tmp):
    (tmp / "w" / "vis_data").mkdir(parents=True)
    (tmp / "w" / "vis_data" / "scalars.json").write_text('{"step": 1, "loss": 1.0}\n')
    return _train(base, tmp, "--resume")


@cli_case("loss", "summary-json-only", "summary.json")
def _(base, tmp):
    (tmp / "w").mkdir()
    (tmp / "w" / "summary.json").write_text("{}")
    return _train(base, tmp)


@cli_case("loss", "plot-summary-onto-input", "--summary", "input")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.png", "--summary",
            base / "run" / "vis_data" / "scalars.json"]


@cli_case("loss", "plot-summary-onto-run-folder-input", "--summary", "input")
def _(base, tmp):
    return ["logs", "plot", base / "run" / "vis_data" / "scalars.json", "--out", tmp / "p.png", "--summary",
            base / "run" / "vis_data" / "scalars.json"]


@cli_case("loss", "plot-summary-onto-reference", "--summary", "input")
def _(base, tmp):
    log = tmp / "ref.json"
    shutil.copy(base / "run" / "vis_data" / "scalars.json", log)
    return ["logs", "plot", base / "run", "--reference", log, "--out", tmp / "p.png", "--summary", log]


@cli_case("loss", "plot-summary-equals-out", "same file as --out")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.png", "--summary", tmp / "p.png"]


@cli_case("loss", "plot-out-onto-input", "--out", "also an input")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", base / "run" / "vis_data" / "scalars.json"]


@cli_case("logs", "plot-out-unknown-format", "unknown figure format", "p.xyz")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.xyz"]


@cli_case("loss", "weights-onto-input", "also an input")
def _(base, tmp):
    src = tmp / "weights.json"
    shutil.copy(base / "freq" / "frequencies.json", src)
    return ["stats", "weights", src]


@cli_case("loss", "clean-out-onto-input", "also an input")
def _(base, tmp):
    (tmp / "r").mkdir()
    log = tmp / "r" / "loss.csv"
    shutil.copy(base / "run" / "vis_data" / "scalars.json", log)
    return ["logs", "clean", log, "--out", tmp / "r"]


# ------------------------------------------------------------------ output paths that cannot be made

def _out_cases():
    kinds = {
        "existing-file": lambda base, tmp: (base / "afile", "is a file"),
        "under-file": lambda base, tmp: (base / "afile" / "sub", "which is a file"),
        "read-only-place": lambda base, tmp: (Path("/proc/segreward_no/out"), "cannot be created"),
    }
    commands = {
        "stats-freq": lambda base, out: ["stats", "freq", base / "ann", "--out", out, "--no-progress"],
        "stats-weights": lambda base, out: ["stats", "weights", base / "freq" / "frequencies.json", "--out", out],
        "train-work-dir": lambda base, out: ["train", base / "tiny.yaml", "--work-dir", out],
        "demo": lambda base, out: ["demo", "--quick", "--out", out, "--no-progress"],
        "logs-clean": lambda base, out: ["logs", "clean", base / "run", "--out", out],
    }
    for cname, cmd in commands.items():
        for kname, kind in kinds.items():
            def make(base, tmp, cmd=cmd, kind=kind):
                out, _ = kind(base, tmp)
                return cmd(base, out)
            needle = {"existing-file": "is a file", "under-file": "which is a file",
                      "read-only-place": "segreward_no"}[kname]
            CASES.append(pytest.param(Case(f"out:{cname}:{kname}", make, (needle,)), id=f"out:{cname}:{kname}"))
    plot_kinds = {
        "out-under-file": (lambda base, tmp: ["--out", base / "afile" / "p.png"], "is a file"),
        "out-read-only": (lambda base, tmp: ["--out", "/proc/segreward_p.png"], "not writable"),
        "out-is-folder": (lambda base, tmp: ["--out", tmp], "is a folder"),
        "summary-under-file": (lambda base, tmp: ["--out", tmp / "p.png", "--summary", base / "afile" / "s.csv"],
                               "is a file"),
        "summary-read-only": (lambda base, tmp: ["--out", tmp / "p.png", "--summary", "/proc/segreward_s.csv"],
                              "--summary"),
        "summary-is-folder": (lambda base, tmp: ["--out", tmp / "p.png", "--summary", tmp], "is a folder"),
    }
    for kname, (opts, needle) in plot_kinds.items():
        def make(base, tmp, opts=opts):
            return ["logs", "plot", base / "run", *opts(base, tmp)]
        CASES.append(pytest.param(Case(f"out:logs-plot:{kname}", make, (needle,)), id=f"out:logs-plot:{kname}"))


_out_cases()


# ------------------------------------------------------------------ config files

def _cfg_file(name, content: bytes | None, *needles):
    def make(base, tmp):
        path = tmp / "c.yaml"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return ["train", path]
    CASES.append(pytest.param(Case(f"cfg:{name}", make, ("c.yaml", *needles)), id=f"cfg:{name}"))


_cfg_file("directory", None, "is a folder")
_cfg_file("binary", b"\x00\x01\x02PK\x03\x04" * 10, "binary")
_cfg_file("non-utf8", "name: caf\u00e9\n".encode("latin-1"), "UTF-8")
_cfg_file("empty", b"", "empty")
_cfg_file("comments-only", b"# nothing here\n", "empty")
_cfg_file("not-yaml", b"train: [1, 2\n", "not valid YAML")
_cfg_file("top-level-list", b"- a\n- b\n", "mapping")
_cfg_file("top-level-scalar", b"42\n", "mapping")
_cfg_file("duplicate-section", b"train:\n  iters: 2\ntrain:\n  iters: 3\n", "'train' appears twice")
_cfg_file("duplicate-nested", b"train:\n  iters: 2\n  iters: 3\n", "'iters' appears twice")
_cfg_file("unknown-key", b"train:\n  itres: 2\n", "train.itres")
_cfg_file("wrong-type", b"train:\n  iters: many\n", "train.iters")
_cfg_file("section-not-mapping", b"train: 5\n", "train")


@cli_case("cfg", "missing-file", "nope.yaml", "not found")
def _(base, tmp):
    return ["train", tmp / "nope.yaml"]


# ------------------------------------------------------------------ config values

def _value(name, override, *needles):
    def make(base, tmp):
        return _train(base, tmp, *([override] if isinstance(override, str) else override))
    CASES.append(pytest.param(Case(f"val:{name}", make, needles), id=f"val:{name}"))


_value("device-gpu0", "train.device=gpu0", "'gpu0'", "cpu")
_value("device-cuda-7", "train.device=cuda:7", "cuda:7", "available")
if not torch.cuda.is_available():
    _value("device-cuda-cpu-build", "train.device=cuda", "'cuda'", "available: auto, cpu")
_value("device-number", "train.device=0", "train.device")
_value("crop-negative", "train.crop=[0,-5]", "train.crop", "[0, -5]")
_value("crop-one-number", "train.crop=[32]", "train.crop")
_value("crop-fraction", "train.crop=[1.5,2]", "train.crop")
_value("crop-string", "train.crop=big", "train.crop")
_value("ema-momentum-above-1", "pseudo_label.ema_momentum=1.5", "pseudo_label.ema_momentum", "1.5")
_value("ema-momentum-negative", "pseudo_label.ema_momentum=-0.1", "pseudo_label.ema_momentum")
_value("threshold-1", "pseudo_label.threshold=1.0", "pseudo_label.threshold")
_value("loss-momentum-1", "loss.momentum=1", "loss.momentum")
_value("k-fraction", "loss.k=2.5", "loss.k", "2.5")
_value("k-zero", "loss.k=0", "loss.k")
_value("num-classes-fraction", "model.num_classes=2.5", "model.num_classes", "2.5")
_value("num-classes-zero", "model.num_classes=0", "model.num_classes")
_value("num-classes-disagrees", "model.num_classes=3", "model.num_classes=3")
_value("class-weight-negative", "loss.class_weight=[1,-1,1,1,1,1,1,1]", "loss.class_weight[1]", "-1")
_value("class-weight-nan", "loss.class_weight=[1,.nan,1,1,1,1,1,1]", "loss.class_weight[1]", "nan")
_value("class-weight-inf", "loss.class_weight=[1,.inf,1,1,1,1,1,1]", "loss.class_weight[1]", "inf")
_value("class-weight-empty", "loss.class_weight=[]", "loss.class_weight")
_value("class-weight-text", "loss.class_weight=[a,b]", "loss.class_weight[0]", "'a'")
_value("class-weight-zeros", "loss.class_weight=[0,0,0,0,0,0,0,0]", "loss.class_weight")
_value("class-weight-count", "loss.class_weight=[1,2]", "2 entries", "8 classes")
_value("class-weight-missing-file", "loss.class_weight=nowhere.json", "nowhere.json")
_value("reward-class-weight-negative", ["loss.reward_class_weight=[-1]", "stage=tune"], "loss.reward_class_weight")
_value("lr-negative", "optim.lr=-1", "optim.lr")
_value("lr-nan", "optim.lr=.nan", "optim.lr")
_value("grad-clip-zero", "optim.grad_clip=0", "optim.grad_clip")
_value("weight-decay-negative", "optim.weight_decay=-1", "optim.weight_decay")
_value("iters-zero", "train.iters=0", "train.iters")
_value("batch-not-divisible", ["train.batch_size=3", "train.accumulate=2"], "train.batch_size=3")
_value("fp16-on-cpu", ["train.amp=fp16", "train.device=cpu"], "fp16")
_value("fraction-zero", "loss.fraction=0", "loss.fraction")
_value("block-zero", "loss.block=0", "loss.block")
_value("workers-negative", "train.num_workers=-1", "train.num_workers")
_value("temperature-zero", "loss.temperature=0", "loss.temperature")
_value("stage-unknown", "stage=finetune", "'finetune'", "pretrain, tune")
_value("loss-type-unknown", "loss.type=dice", "'dice'")
_value("override-no-equals", "train.iters", "train.iters")
_value("override-under-a-value", "train.iters.x=1", "train.iters")
_value("dataset-unknown", "data.train.type=imagenet", "imagenet")
_value("synthetic-bad-keyword", "data.train.colour=red", "synthetic")


@cli_case("val", "folder-root-missing", "/nonexistent/ds")
def _(base, tmp):
    cfg = tiny(tmp / "w")
    cfg["data"]["train"] = {"type": "folder", "root": "/nonexistent/ds"}
    return ["train", write_yaml(tmp / "c.yaml", cfg)]


# ------------------------------------------------------------------ checkpoints and resume

def _other_classes_ckpt(tmp):
    from segreward.models import build_model, save_weights
    path = tmp / "five.safetensors"
    save_weights(build_model("unet", 5, width=4), path)
    return path


@cli_case("ckpt", "start-weights-other-classes", "num_classes=5", "model.checkpoint_strict")
def _(base, tmp):
    return _train(base, tmp, f"model.checkpoint={_other_classes_ckpt(tmp)}")


@cli_case("ckpt", "start-weights-missing", "gone.pt")
def _(base, tmp):
    return _train(base, tmp, f"model.checkpoint={tmp / 'gone.pt'}")


@cli_case("ckpt", "start-weights-folder", "{tmp}")
def _(base, tmp):
    return _train(base, tmp, f"model.checkpoint={tmp}")


@cli_case("ckpt", "start-weights-garbage", "junk.pt")
def _(base, tmp):
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    return _train(base, tmp, f"model.checkpoint={tmp / 'junk.pt'}")


@cli_case("ckpt", "resume-other-width", "last.pt", "model.options.width: 4 -> 8")
def _(base, tmp):
    shutil.copytree(base / "run", tmp / "w")
    return _train(base, tmp, "--resume", "train.iters=4", "model.options.width=8")


@cli_case("ckpt", "resume-unknown-model", "'fcn'")
def _(base, tmp):
    shutil.copytree(base / "run", tmp / "w")
    return _train(base, tmp, "--resume", "train.iters=4", "model.name=fcn")


@cli_case("ckpt", "resume-finished-run", "already finished", "train.iters")
def _(base, tmp):
    return ["train", base / "tiny.yaml", "--resume"]


@cli_case("ckpt", "resume-corrupt-checkpoint", "last.pt", "not a checkpoint")
def _(base, tmp):
    (tmp / "w" / "checkpoints").mkdir(parents=True)
    (tmp / "w" / "checkpoints" / "last.pt").write_bytes(b"\x00" * 64)
    return _train(base, tmp, "--resume")


@cli_case("ckpt", "resume-narrower-model", "last.pt", "model.options.width: 4 -> 6")
def _(base, tmp):
    shutil.copytree(base / "run", tmp / "w")
    return _train(base, tmp, "--resume", "train.iters=4", "model.options.width=6")


# ------------------------------------------------------------------ stats

def _freq_json(name, data, *needles, extra=()):
    def make(base, tmp):
        path = tmp / "frequencies.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return ["stats", "weights", path, "--out", tmp / "o", *extra]
    CASES.append(pytest.param(Case(f"stats:{name}", make, needles), id=f"stats:{name}"))


_freq_json("num-classes-disagrees", {"num_classes": 5, "counts": [1, 2, 3]}, "num_classes is 5", "3 entries")
_freq_json("negative-count", {"counts": [1, -2, 3]}, "counts")
_freq_json("nan-count", '{"counts": [1, NaN, 3]}', "counts")
_freq_json("fractional-count", {"counts": [1, 2.5, 3]}, "counts")
_freq_json("empty-counts", {"counts": []}, "empty")
_freq_json("no-counts", {"weights": [1, 2]}, "counts")
_freq_json("not-json", "{counts: ", "not a readable JSON")
_freq_json("max-weight-negative", {"counts": [1, 2, 3]}, "max_weight", extra=("--max-weight", "-1"))
_freq_json("zero-weight-nan", {"counts": [1, 0, 3]}, "zero_weight", extra=("--zero-weight", "nan"))
_freq_json("smooth-nan", {"counts": [1, 2, 3]}, "smooth", extra=("--smooth", "nan"))


@cli_case("stats", "weights-missing-file", "nofreq.json")
def _(base, tmp):
    return ["stats", "weights", tmp / "nofreq.json", "--out", tmp / "o"]


@cli_case("stats", "freq-missing-root", "noroot")
def _(base, tmp):
    return ["stats", "freq", tmp / "noroot", "--out", tmp / "o", "--no-progress"]


@cli_case("stats", "freq-num-classes-fraction", "--num-classes", "2.5")
def _(base, tmp):
    return ["stats", "freq", base / "ann", "--num-classes", "2.5", "--out", tmp / "o"]


@cli_case("stats", "freq-num-classes-zero", "--num-classes")
def _(base, tmp):
    return ["stats", "freq", base / "ann", "--num-classes", "0", "--out", tmp / "o"]


# ------------------------------------------------------------------ logs

@cli_case("logs", "clean-missing-path", "nolog")
def _(base, tmp):
    return ["logs", "clean", tmp / "nolog", "--out", tmp / "o"]


@cli_case("logs", "plot-missing-path", "nolog")
def _(base, tmp):
    return ["logs", "plot", tmp / "nolog", "--out", tmp / "p.png"]


@cli_case("logs", "plot-bad-trend", "trend")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.png", "--trend", "1,2,three"]


@cli_case("logs", "plot-unknown-metric", "mIoUU")
def _(base, tmp):
    return ["logs", "plot", base / "run", "--out", tmp / "p.png", "--metric", "mIoUU"]


@cli_case("logs", "clean-garbage-log", "scalars.json")
def _(base, tmp):
    (tmp / "vis_data").mkdir()
    (tmp / "vis_data" / "scalars.json").write_bytes(b"\x00\xff garbage")
    return ["logs", "clean", tmp / "vis_data" / "scalars.json", "--out", tmp / "o"]


# ------------------------------------------------------------------ library

def lib(name, *needles, marks=()):
    def deco(fn):
        CASES.append(pytest.param(Case(f"lib:{name}", lambda base, tmp: (lambda: fn(base, tmp)), needles),
                                  id=f"lib:{name}", marks=marks))
        return fn
    return deco


@lib("metric-fractional-labels", "1.5")
def _(base, tmp):
    from segreward.metrics import SegMetric
    SegMetric(3).update(torch.tensor([[1, 1]]), torch.tensor([[1.0, 1.5]]))


@lib("metric-num-classes-fraction", "2.5")
def _(base, tmp):
    from segreward.metrics import SegMetric
    SegMetric(2.5)


@lib("metric-prediction-out-of-range-no-sentinel", "prediction values [7]")
def _(base, tmp):
    from segreward.metrics import SegMetric
    try:
        SegMetric(3).update(torch.tensor([[7, 1]]), torch.tensor([[1, 1]]))
    except SegrewardError as e:
        assert "4611686018427387904" not in str(e) and "ignore index" not in str(e)
        raise


@lib("confusion-shape-mismatch", "shape")
def _(base, tmp):
    from segreward.metrics import confusion_matrix
    confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long), 3)


@lib("load-config-directory", "is a folder")
def _(base, tmp):
    from segreward.engine import load_config
    load_config(tmp)


@lib("config-dict-bad-value", "train.crop")
def _(base, tmp):
    from segreward.engine import config_from_dict
    config_from_dict({"train": {"crop": [0, -5]}})


@lib("train-existing-run", "already holds a run", "{base}/run")
def _(base, tmp):
    from segreward.engine import config_from_dict, train
    train(config_from_dict(tiny(base / "run")))


@lib("output-onto-input", "also an input")
def _(base, tmp):
    from segreward.outputs import check_output_file
    check_output_file(base / "afile", "--out", inputs=[base / "afile"])


@lib("output-exists-no-overwrite", "--overwrite")
def _(base, tmp):
    from segreward.outputs import check_output_file
    check_output_file(base / "afile", "--out", overwrite=False)


@lib("ensure-dir-under-file", "which is a file")
def _(base, tmp):
    from segreward.outputs import ensure_dir
    ensure_dir(base / "afile" / "x", "--out")


@lib("read-class-weight-negative", "-1.0")
def _(base, tmp):
    from segreward.engine.builders import read_class_weight
    read_class_weight([1.0, -1.0], 2)


@lib("frequencies-dict-num-classes", "num_classes is 4")
def _(base, tmp):
    from segreward.stats.counting import ClassFrequencies
    ClassFrequencies.from_dict({"num_classes": 4, "counts": [1, 2]})


@lib("reinforce-reward-wrong-shape", "reward")
def _(base, tmp):
    from segreward import ReinforceLoss
    loss = ReinforceLoss(3, reward=lambda pred, target: torch.zeros(2, 2, 2), k=2)
    loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))


@lib("reinforce-reward-wrong-type", "reward")
def _(base, tmp):
    from segreward import ReinforceLoss
    loss = ReinforceLoss(3, reward=lambda pred, target: [0.0] * pred.shape[0], k=2)
    loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))


@lib("reinforce-empty-batch", "batch")
def _(base, tmp):
    from segreward import ReinforceLoss
    ReinforceLoss(3, k=2)(torch.randn(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long))


@lib("reinforce-class-weight-path", "nowhere.json")
def _(base, tmp):
    from segreward import ReinforceLoss
    ReinforceLoss(3, k=2, class_weight=str(tmp / "nowhere.json"))


# ------------------------------------------------------------------ behaviours that must succeed

def test_there_are_at_least_100_kinds():
    assert len(CASES) >= 100


def test_resume_without_checkpoint_says_so_and_trains(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "w"))
    assert main(["train", str(cfg), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starting from scratch" in err
    assert (tmp_path / "w" / "model.safetensors").exists()


def test_overwrite_replaces_a_run_cleanly(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "w"))
    assert main(["train", str(cfg)]) == 0
    (tmp_path / "w" / "vis_data" / "extra.txt").write_text("old run")
    assert main(["train", str(cfg), "--overwrite", "train.iters=3"]) == 0
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "w" / "vis_data" / "scalars.json").read_text().splitlines()
             if "lr" in ln]
    assert steps == [1, 2, 3]  # one run's steps, not two runs appended
    assert not (tmp_path / "w" / "vis_data" / "extra.txt").exists()
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["step"] == 3


def test_a_failed_run_leaves_no_half_folder(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny(tmp_path / "w", **{"optim": {"name": "sgd", "lr": 1e30},
                                                                   "train.log_every": 10}))
    assert main(["train", str(cfg)]) == 2
    assert "the loss became" in capsys.readouterr().err
    assert not (tmp_path / "w" / "config.yaml").exists() and not (tmp_path / "w" / "vis_data").exists()


def test_all_ignored_batch_contributes_zero_ce(tmp_path):
    from segreward.engine.builders import CrossEntropy
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = CrossEntropy(ignore_index=255)(logits, torch.full((2, 4, 4), 255))
    loss.backward()
    assert float(loss) == 0.0 and torch.all(logits.grad == 0)


def test_pseudo_labels_all_below_threshold_do_not_stop_a_ce_run(tmp_path):
    from segreward.engine import config_from_dict, train
    result = train(config_from_dict(tiny(tmp_path / "w", **{"pseudo_label.enabled": True,
                                                             "pseudo_label.threshold": 0.999999})))
    assert result["step"] == 2


def test_checkpoint_strict_false_is_a_real_key(tmp_path):
    from segreward.engine import config_from_dict, train
    path = _other_classes_ckpt(tmp_path)
    result = train(config_from_dict(tiny(tmp_path / "w", **{"model.checkpoint": str(path),
                                                             "model.checkpoint_strict": False})))
    assert result["step"] == 2


def test_demo_twice_replaces_its_own_folder(tmp_path, monkeypatch, capsys):
    from segreward import demo

    def tiny_quick(cls=demo.DemoSettings, **kw):
        return cls(size=(16, 32), n_source=4, n_target_labelled=2, n_eval=2, n_replay=2, pretrain_iters=2,
                   finetune_iters=2, extra_iters=2, batch_size=2, width=4, **kw)

    monkeypatch.setattr(demo.DemoSettings, "quick", classmethod(lambda cls, **kw: tiny_quick(cls, **kw)))
    for _ in range(2):
        assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    log = tmp_path / "seed0" / "source_only" / "vis_data" / "scalars.json"
    steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines() if "lr" in ln]
    assert steps == sorted(set(steps))  # the second demo replaced the first, nothing appended


def test_plot_with_unwritable_summary_writes_no_figure(base, tmp_path, capsys):
    code = main(["logs", "plot", str(base / "run"), "--out", str(tmp_path / "p.png"),
                 "--summary", str(base / "afile" / "s.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "--summary" in err and not (tmp_path / "p.png").exists()


def test_no_traceback_from_a_real_process(base, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\x00\x01binary")
    r = subprocess.run([sys.executable, "-m", "segreward", "train", str(cfg)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "segreward", "train", str(base / "tiny.yaml")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--resume" in r.stderr
