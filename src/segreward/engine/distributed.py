"""DDP set-up from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from segreward.errors import SegrewardError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(name: str, what: str = "train.device") -> None:
    """Refuse a device name that is no device, or a device this machine does not have (torch
    knows ``meta``, and ``mps`` off a Mac, but cannot train on them), naming the ones it has."""
    from segreward.engine.config import check_device_name
    check_device_name(name, what)
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("mps")
    if name == "auto" or name == "cpu" or name in have or (name == "cuda" and len(have) > 1 and "cuda:0" in have):
        return
    raise SegrewardError(f"{what} = {name!r} is not available on this machine"
                         f"{' (this torch build has no CUDA)' if name.startswith('cuda') and not torch.backends.cuda.is_built() else ''}; "
                         f"available: auto, {', '.join(have)}")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun: NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        dev = torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistInfo(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any (e.g. "stop: the loss is not finite")."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
