"""Read TensorBoard event files into the same tables as ``scalars.json``.

Uses TensorBoard's own ``EventAccumulator`` (all events kept, no sampling). Scalars written
with ``add_scalar`` (PyTorch, TF1) and TF2 scalar summaries (stored as tensors) are both read.

TensorBoard has no notion of a "line", so tags are sorted into training and validation
columns: a tag is training when :func:`~segreward.runlog._keys.is_train_key` says so, when it
is ``time``/``data_time``, or when it has at least half as many points as the most-logged
training tag (e.g. ``decode.acc_seg``, logged with every loss); every other tag is a
validation metric. A ``train/``, ``val/`` or ``test/`` prefix decides on its own and is
dropped from the column name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segreward.errors import SegrewardError
from segreward.runlog._keys import SHARED_KEYS, is_train_key, strip_mode_prefix


def _accumulator(path: Path):
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError as e:
        raise SegrewardError(f"{path}: reading TensorBoard event files needs the tensorboard "
                             "package: pip install 'segreward[tensorboard]'") from e
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def read_event_series(path: Path) -> dict[str, pd.Series]:
    """All scalar series of one event file or folder: ``{tag: Series(values, index=step)}``,
    the last value kept where a step repeats."""
    acc = _accumulator(path)
    tags = acc.Tags()
    series: dict[str, pd.Series] = {}
    for tag in tags.get("scalars", []):
        ev = acc.Scalars(tag)
        series[tag] = pd.Series([e.value for e in ev], index=[e.step for e in ev], dtype="float64")
    if tags.get("tensors"):
        from tensorboard.util import tensor_util

        for tag in tags["tensors"]:
            steps, values = [], []
            for e in acc.Tensors(tag):
                arr = tensor_util.make_ndarray(e.tensor_proto)
                if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
                    steps.append(e.step)
                    values.append(float(arr.reshape(())))
            if steps and tag not in series:
                series[tag] = pd.Series(values, index=steps, dtype="float64")
    return {t: s[~s.index.duplicated(keep="last")] for t, s in series.items()}


def _split(series: dict[str, pd.Series]) -> tuple[list[str], list[str]]:
    decided = {t: is_train_key(t) for t in series if t.startswith(("train/", "val/", "test/"))}
    rest = [t for t in series if t not in decided]
    train = {t for t in rest if is_train_key(t) or t in SHARED_KEYS}
    n_train = max((len(series[t]) for t in train if t not in SHARED_KEYS), default=0)
    for t in rest:
        if t not in train and n_train and len(series[t]) * 2 >= n_train:
            train.add(t)
    train_tags = [t for t in series if decided.get(t, t in train)]
    val_tags = [t for t in series if t not in train_tags]
    return train_tags, val_tags


def _table(series: dict[str, pd.Series], tags: list[str]) -> pd.DataFrame:
    if not tags:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    df = pd.concat({strip_mode_prefix(t): series[t] for t in tags}, axis=1).sort_index()
    df.index.name = "step"
    return df.reset_index().astype({"step": "int64"})


def read_event_dirs(sources: list[Path], notes: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(loss, metrics)`` tables from event folders/files read in order (later wins)."""
    merged: dict[str, pd.Series] = {}
    for src in sources:
        for tag, s in read_event_series(Path(src)).items():
            if tag in merged:
                s = pd.concat([merged[tag], s])
                s = s[~s.index.duplicated(keep="last")]
            merged[tag] = s
    train_tags, val_tags = _split(merged)
    return _table(merged, train_tags), _table(merged, val_tags)
