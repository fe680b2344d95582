"""The demo's promise: the same seed (and thread count) gives the same numbers. A tiny demo-like
chain (CE pretrain with augmentation, reward tuning from its weights, calibration) run twice in
one process -- with the global RNG disturbed in between, and with another evaluation schedule --
must give bit-identical metrics, losses and weights."""

from __future__ import annotations

import json

import pytest
import torch

from segreward.engine import config_from_dict, train
from segreward.models import read_state_dict

SIZE = [32, 32]
DUSK_VAL = {"type": "synthetic", "style": "dusk", "n": 4, "split": "val", "size": SIZE, "seed": 3}


def _chain(work, eval_every: int) -> dict:
    common = {"seed": 3, "model": {"name": "unet", "options": {"width": 8}}, "data": {"val": {"dusk": DUSK_VAL}}}
    pre = dict(common, name="pre", work_dir=str(work / "pre"), stage="pretrain",
               data={**common["data"], "train": {"type": "synthetic", "style": "day", "n": 4, "size": SIZE, "seed": 3}},
               train={"iters": 2, "batch_size": 4, "eval_every": eval_every, "progress": False, "augment": True},
               optim={"lr": 0.01})
    train(config_from_dict(pre), overwrite=True)
    tune = dict(common, name="tune", work_dir=str(work / "tune"), stage="tune",
                model={**common["model"], "checkpoint": str(work / "pre" / "model.safetensors")},
                data={**common["data"], "train": {"type": "synthetic", "style": "dusk", "n": 8, "size": SIZE,
                                                  "seed": 3}},
                loss={"type": "reinforce", "estimator": "local", "scope": "batch", "ce_weight": 0.5},
                train={"iters": 2, "batch_size": 4, "eval_every": eval_every, "progress": False, "augment": True,
                       "log_every": 1},
                optim={"name": "adam", "lr": 1e-3, "schedule": "constant"},
                calibrate={"enabled": True, "data": "dusk", "mode": "exact", "kfold": 2})
    result = train(config_from_dict(tune), overwrite=True)
    losses = [{k: v for k, v in line.items() if k not in ("time", "data_time")}
              for line in map(json.loads, (work / "tune" / "vis_data" / "scalars.json").read_text().splitlines())
              if "loss" in line]
    weights, _ = read_state_dict(work / "tune" / "model_calibrated.safetensors")
    return {"val": result["val"]["dusk"], "cal": result["val_calibrated"]["dusk"], "losses": losses,
            "offsets": result["calibration"].offsets.tolist(), "cv": result["calibration"].cv, "weights": weights}


def _same(a: dict, b: dict) -> None:
    for key in ("val", "cal", "losses", "offsets", "cv"):
        assert a[key] == b[key], key  # bit-identical floats, not approx
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("first"), eval_every=2)


def test_the_same_seed_gives_bit_identical_results(first, tmp_path):
    torch.rand(123)  # whatever ran before in the process must not matter
    _same(first, _chain(tmp_path, eval_every=2))


def test_how_often_a_run_evaluates_does_not_change_its_training(first, tmp_path):
    """Evaluation draws nothing from the training's random numbers (augmentation, samples)."""
    _same(first, _chain(tmp_path, eval_every=1))
