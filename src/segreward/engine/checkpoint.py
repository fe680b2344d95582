"""Checkpoints as plain data, written atomically (temp file + rename), read with
``weights_only=True``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from segreward.errors import SegrewardError


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SegrewardError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise SegrewardError(f"{path}: is a folder, not a checkpoint file") from None
    except Exception as e:  # corrupt or not a torch file; torch's messages run over many lines
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SegrewardError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first}); "
                             "the file is damaged or not a segreward checkpoint") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
