"""Checkpoints as plain data, written atomically (temp file + rename), read with
``weights_only=True``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch



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


_TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "rng")


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint written by :func:`atomic_save` in the trainer, or a one-line error:
    not a checkpoint (text, a bare tensor, model weights without the optimiser and step), damaged."""
    from segreward.models.weights import is_safetensors, not_a_checkpoint, torch_load
    path = Path(path)
    what = "a training checkpoint (checkpoints/last.pt of `segreward train`)"
    weights_only = ("model weights are not a training checkpoint; start from them with model.checkpoint=FILE "
                    "instead of --resume")
    if path.is_dir():
        raise not_a_checkpoint(path, "a folder", what)
    if is_safetensors(path):
        raise not_a_checkpoint(path, f"a safetensors weights file: {weights_only}", what)
    obj = torch_load(path, what)
    if not isinstance(obj, dict):
        raise not_a_checkpoint(path, f"it holds a {type(obj).__name__}", what)
    missing = [k for k in _TRAINING_KEYS if k not in obj]
    if missing:
        raise not_a_checkpoint(path, f"no {', '.join(missing)} in it: {weights_only}", what)
    return obj


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
