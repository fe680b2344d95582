"""The local estimator through the trainer: config keys, diagnostics in the run log, and the
running-scope state surviving a kill + --resume (bit-identical weights)."""

import torch

from segreward.engine import config_from_dict, train
from test_engine import _segreward, _write_config, kill_after_first_checkpoint, read_jsonl, tiny_config, weights


def test_local_estimator_logs_credit_diagnostics(tmp_path):
    train(config_from_dict(tiny_config(tmp_path / "pre", **{"train.iters": 3})))
    cfg = tiny_config(tmp_path / "tune", stage="tune", **{
        "model.checkpoint": str(tmp_path / "pre" / "model.safetensors"), "train.iters": 4,
        "loss": {"estimator": "local", "scope": "batch", "ce_weight": 0.5}})
    train(config_from_dict(cfg))
    lines = [x for x in read_jsonl(tmp_path / "tune" / "vis_data" / "scalars.json") if "loss" in x]
    assert {"reward_mean", "greedy_reward", "credit_abs", "credit_label_pos", "entropy"} <= set(lines[-1])
    pre, tuned = weights(tmp_path / "pre" / "model.safetensors"), weights(tmp_path / "tune" / "model.safetensors")
    assert any(not torch.equal(pre[k], tuned[k]) for k in pre)


def test_running_scope_state_survives_kill_and_resume(tmp_path):
    common = {"train.iters": 24, "train.checkpoint_every": 4, "train.eval_every": 24, "stage": "tune",
              "train.progress": False, "loss": {"type": "reinforce", "estimator": "local", "scope": "running",
                                                "momentum": 0.8}}
    ref = _segreward("train", str(_write_config(tmp_path / "ref.yaml", tiny_config(tmp_path / "ref", **common))))
    assert ref.returncode == 0, ref.stderr[-2000:]

    cfg_path = _write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", **common))
    ckpt = kill_after_first_checkpoint(cfg_path, tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)
    assert 0 < state["step"] < 24
    assert float(state["loss"]["running_counts"].sum()) > 0  # the running counts are in the checkpoint
    resumed = _segreward("train", str(cfg_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "ref" / "model.safetensors"), weights(tmp_path / "run" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    final_ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)["loss"]["running_counts"]
    final_run = torch.load(ckpt, weights_only=True)["loss"]["running_counts"]
    torch.testing.assert_close(final_ref, final_run, rtol=0, atol=0)
