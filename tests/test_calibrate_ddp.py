"""Streaming calibration under DDP: two gloo processes, each streaming half of the images,
all-reduce their threshold histograms and find the same offsets as one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segreward.calibrate import fit_offsets_streaming

N, C = 8, 4


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (N, 12, 10), generator=g)
    labels[:, 0] = 255
    logits = 1.5 * torch.nn.functional.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    logits += torch.randn(N, C, 12, 10, generator=g)
    logits[:, 2] -= 1.0
    return logits, labels


def _fit(rank: int, world: int):
    logits, labels = _data()
    mine = list(range(rank, N, world))
    cal = fit_offsets_streaming(lambda: ((logits[i:i + 1], labels[i:i + 1]) for i in mine), C, bins=128, span=4.0)
    return cal.offsets, cal.reward_after, cal.history


def _worker(rank: int, world: int, init: str, out: dict):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out[rank] = _fit(rank, world)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    one = _fit(0, 1)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
        parts = [out[0], out[1]]
    assert one[1] > one[2][0]  # the fit did something
    for offsets, reward, history in parts:
        torch.testing.assert_close(offsets, one[0], rtol=0, atol=0)
        assert reward == one[1] and history == one[2]
