"""Scope 'batch' under DDP: two gloo processes, each holding half of the batch, get the same
credits and the same (DDP-averaged) gradient as one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import segreward.reinforce as reinforce
import segreward.sampling as sampling
from segreward.credit import credit_table
from segreward.reinforce import ReinforceLoss

C, B, H, W, IGN = 4, 4, 6, 7, 255


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[:, 0, :3] = IGN
    samples = torch.randint(0, C, (1, B, H, W), generator=g)
    return logits, target, samples


def _run(rank: int, world: int, logits, target, samples, scope: str):
    """Credit table, logits gradient (averaged like DDP) and diagnostics of this rank's part."""
    part = slice(rank * B // world, (rank + 1) * B // world)
    logits = logits[part].clone().requires_grad_(True)
    target, samples = target[part], samples[:, part]
    # The same sample in both layouts: uniforms in the middle of each sample's CDF interval (both
    # the fused loop and the tensor code draw through these uniforms).
    with torch.no_grad():
        p = torch.softmax(logits, 1)
        mid = (torch.cumsum(p, 1) - p / 2).gather(1, samples.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    draw = reinforce.uniforms, sampling.uniforms
    reinforce.uniforms = sampling.uniforms = lambda k, b, h, w, device, generator: mid.contiguous()
    try:
        loss_fn = ReinforceLoss(C, estimator="local", scope=scope, ignore_index=IGN)
        loss_fn(logits, target).backward()
    finally:
        reinforce.uniforms, sampling.uniforms = draw
    # DDP averages parameter gradients over ranks, i.e. each rank's logits gradient counts 1/world.
    grad = logits.grad.clone() / world
    cnt = loss_fn._batch_counts(samples, target)[0]
    credit = credit_table(loss_fn.form, samples[0], target, cnt, ignore_index=IGN, dtype=torch.float64)
    return credit, grad, loss_fn.diagnostics["reward_mean"]


def _worker(rank: int, world: int, init: str, scope: str, out: dict):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out[rank] = _run(rank, world, *_inputs(), scope)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "tensor"])
def test_batch_scope_under_two_gloo_processes_matches_one_process(tmp_path, monkeypatch, fused):
    monkeypatch.setenv("SEGREWARD_NUMBA", "1" if fused else "0")  # inherited by the spawned ranks
    logits, target, samples = _inputs()
    credit_one, grad_one, reward_one = _run(0, 1, logits, target, samples, "batch")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", "batch", out), nprocs=2, join=True)
        parts = [out[0], out[1]]
    credit_ddp = torch.cat([p[0] for p in parts])
    torch.testing.assert_close(credit_ddp, credit_one, rtol=0, atol=1e-12)
    assert bool((credit_one != 0).any())
    # The loss scales by the world size, so the DDP average of the ranks' gradients equals one
    # process's gradient of the batch reward.
    grad_ddp = torch.cat([p[1] for p in parts])
    torch.testing.assert_close(grad_ddp, grad_one, rtol=1e-10, atol=1e-14)
    assert parts[0][2] == parts[1][2] == reward_one  # every rank scores the global batch
