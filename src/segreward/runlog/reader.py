"""Read mmengine-format ``scalars.json`` run logs (ours and MMSegmentation's) into tables.

Entry point: :func:`load_run`. A run is a ``scalars.json`` file, a ``vis_data`` folder, a run
folder, or an mmengine ``work_dir`` whose timestamp folders (``20240101_120000/``) hold the
pieces of a resumed run; the pieces are read in time order. Where a step was logged more than
once (a resumed run logging it again, a calibration line after the final evaluation, extra
scalars on their own line), each key keeps the value read last and a line never hides the keys
it does not have: the final evaluation survives a calibration record at the same step. Folders without ``scalars.json`` but with TensorBoard
event files are read with :mod:`segreward.runlog.tensorboard`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from segreward.errors import SegrewardError
from segreward.runlog._keys import is_train_key, strip_mode_prefix

_TIMESTAMP = re.compile(r"^\d{8}_\d{6}$")
_EVENTS = "events.out.tfevents.*"
X_CHOICES = ("auto", "iter", "epoch")


class RunLogWarning(UserWarning):
    """Something in a run log was skipped or guessed (truncated line, epoch axis, ...)."""


@dataclass
class RunLog:
    """One run's scalars, cleaned.

    Attributes:
        name: a short name (the run folder's name).
        loss: training lines, one row per step, sorted; first column ``step`` (iterations,
            or fractional epochs with ``x="epoch"``).
        metrics: validation lines, one row per step, sorted; first column ``step``.
        sources: the files read, in the order read.
        by_epoch: validation ``step`` was the epoch in the log (epoch-based runner).
        x: the unit of ``metrics.step``: ``"iter"`` or ``"epoch"``.
        iters_per_epoch: estimated from the log for epoch-based runs, else None.
        notes: what was skipped or guessed while reading (also issued as warnings).
    """

    name: str
    loss: pd.DataFrame
    metrics: pd.DataFrame
    sources: list = field(default_factory=list)
    by_epoch: bool = False
    x: str = "iter"
    iters_per_epoch: float | None = None
    notes: list = field(default_factory=list)

    @property
    def metric_names(self) -> list[str]:
        return [c for c in self.metrics.columns if c not in ("step", "epoch", "iter", "time", "data_time")]


def _note(notes: list, msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, RunLogWarning, stacklevel=3)


# ---------------------------------------------------------------- parsing one scalars.json


try:  # optional, ~3x faster; it rejects NaN/Infinity, so such files fall back to json
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def _loads_fast(blob: bytes):
    if _orjson is not None:
        try:
            return _orjson.loads(blob)
        except ValueError:
            pass
    return json.loads(blob)


def parse_scalars(path: str | os.PathLike, notes: list | None = None):
    """Parse one ``scalars.json``; returns ``(train_records, val_records)`` (lists of dicts).

    Blank lines are skipped; a line that is not a JSON object is skipped with a warning
    (as a *truncated last line* when it is the last one); ``NaN``/``Infinity`` are read as
    floats. Which lines are training lines is decided by :func:`segreward.runlog._keys.is_train_key`.
    """
    notes = [] if notes is None else notes
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SegrewardError(f"{path}: cannot read the run log ({e})") from e
    lines = data.split(b"\n")
    numbered = [(i, raw) for i, raw in enumerate(lines) if raw.strip()]
    records = None
    if numbered:
        # Fast path: the whole file as one JSON array (a killed run's last line checked alone).
        i_last, last = numbered[-1]
        try:
            json.loads(last)
            body = numbered
        except ValueError:
            body = numbered[:-1]
        try:
            records = _loads_fast(b"[" + b",".join(raw for _, raw in body) + b"]")
            if len(records) != len(body):
                records = None
        except ValueError:
            records = None
        if records is not None and body is not numbered:
            _note(notes, f"{path}:{i_last + 1}: skipped truncated last line "
                         f"{last[:60].decode('utf-8', 'replace')!r}")
    if records is None:  # slow path: line by line, to say which lines are broken
        records = []
        body = []
        for k, (i, raw) in enumerate(numbered):
            try:
                records.append(json.loads(raw))
                body.append((i, raw))
            except ValueError:
                what = "truncated last line" if k == len(numbered) - 1 else "unreadable line"
                _note(notes, f"{path}:{i + 1}: skipped {what} {raw[:60].decode('utf-8', 'replace')!r}")
    train, val = [], []
    kinds: dict[tuple, bool] = {}  # key tuple -> is a training line (lines repeat their keys)
    for (i, _), rec in zip(body, records):
        if not isinstance(rec, dict):
            _note(notes, f"{path}:{i + 1}: skipped a line that is not a JSON object")
            continue
        keys = tuple(rec)
        kind = kinds.get(keys)
        if kind is None:
            kind = kinds[keys] = any(is_train_key(k) for k in keys)
        if "step" not in rec:
            step = rec.get("iter", rec.get("epoch"))
            if step is None:
                _note(notes, f"{path}:{i + 1}: skipped a line without 'step'")
                continue
            rec["step"] = step
        (train if kind else val).append(rec)
    return train, val


def _frame(records: list[dict], notes: list, what: str, path) -> pd.DataFrame:
    if not records:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    df = pd.DataFrame.from_records(records)
    for c in list(df.columns):  # "train/loss" (log_with_hierarchy) -> "loss"
        n = strip_mode_prefix(c)
        if n != c:
            df[n] = df[n].where(df[c].isna(), df[c]) if n in df.columns else df[c]
            df = df.drop(columns=c)
    for c in df.columns:
        if df[c].dtype == object:  # strings, lists, None: keep numbers only
            num = pd.to_numeric(df[c], errors="coerce")
            if num.notna().sum() < df[c].notna().sum():
                _note(notes, f"{path}: {what} key {c!r} has non-numeric values; they read as NaN")
            df[c] = num
    cols = ["step"] + [c for c in df.columns if c != "step"]
    return df[cols]


def merge_steps(records: list[dict]) -> list[dict]:
    """One record per step, in order of first appearance: a later line at the same step
    updates the keys it has (its values win) and keeps the others (an absent key is not NaN)."""
    merged: dict = {}
    for rec in records:
        step = rec["step"]
        merged[step] = {**merged[step], **rec} if step in merged else rec
    return list(merged.values())


def _last_per_step(df: pd.DataFrame) -> pd.DataFrame:
    """Sorted by step, one row per step (rows were already merged by :func:`merge_steps`)."""
    df = df.drop_duplicates("step", keep="last")
    if not df["step"].is_monotonic_increasing:
        df = df.sort_values("step", kind="stable")
    if df["step"].notna().all() and (df["step"] == df["step"].round()).all():
        df = df.astype({"step": "int64"})
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- finding the files


def find_sources(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """Resolve PATH to ``("scalars", [scalars.json, ...])`` or ``("tensorboard", [dirs])``,
    in time order."""
    p = Path(path)
    if not p.exists():
        raise SegrewardError(f"{p}: no such file or folder; give a scalars.json, a vis_data "
                             "folder, a run folder or an mmengine work_dir")
    if p.is_file():
        if p.name.startswith("events.out.tfevents."):
            return "tensorboard", [p]
        return "scalars", [p]
    for candidate in (p / "scalars.json", p / "vis_data" / "scalars.json"):
        if candidate.is_file():
            return "scalars", [candidate]
    found = sorted(p.glob("*/vis_data/scalars.json")) or sorted(p.glob("*/scalars.json"))
    if found:
        return "scalars", _time_order(found, lambda f: f.parent.parent if f.parent.name == "vis_data" else f.parent)
    event_dirs = sorted({f.parent for f in p.rglob(_EVENTS)})
    if event_dirs:
        return "tensorboard", _time_order(event_dirs, lambda d: d)
    raise SegrewardError(
        f"{p}: found no scalars.json (looked in ., vis_data/, <timestamp>/vis_data/) and no "
        "TensorBoard event files; point to the run folder or the scalars.json itself"
    )


def _time_order(items: list[Path], folder_of) -> list[Path]:
    """Timestamp folder names sort in time order; otherwise use modification times."""
    if all(_TIMESTAMP.match(folder_of(f).name) for f in items):
        return sorted(items, key=lambda f: folder_of(f).name)
    return sorted(items, key=lambda f: (f.stat().st_mtime, str(f)))


def _run_name(path: Path) -> str:
    p = path.resolve()
    if p.is_file():
        p = p.parent
    while p.name in ("vis_data",) or _TIMESTAMP.match(p.name):
        p = p.parent
    return p.name or "run"


# ---------------------------------------------------------------- epochs vs iterations


def _detect_by_epoch(loss: pd.DataFrame, metrics: pd.DataFrame) -> bool:
    """Epoch-based runners log validation with ``step`` = epoch while training lines use the
    iteration. Detected when training lines carry ``epoch`` and every validation step is at
    most the last epoch (+1), or, without ``epoch``, when every validation step is below the
    first training step."""
    if metrics.empty or loss.empty:
        return False
    vmax = metrics["step"].max()
    if "epoch" in loss.columns and loss["epoch"].notna().any():
        return bool(vmax <= loss["epoch"].max() + 1 and vmax < loss["step"].max())
    return bool(vmax < loss["step"].min())


def _iters_per_epoch(loss: pd.DataFrame) -> float | None:
    """Estimate from the training lines' ``epoch``: mmengine logs every ``interval``
    iterations *within* an epoch, so the first logged step of consecutive epochs is exactly
    one epoch apart. With a single epoch, its last logged step is the best guess."""
    if "epoch" not in loss.columns:
        return None
    first = loss.dropna(subset=["epoch"]).groupby("epoch")["step"].min()
    if len(first) >= 2:
        e = first.index.to_numpy(np.float64)
        per = np.diff(first.to_numpy(np.float64)) / np.diff(e)
        return float(np.median(per))
    if len(first) == 1 and first.index[0] > 0:
        return float(loss["step"].max() / first.index[0])
    return None


# ---------------------------------------------------------------- public entry point


def load_run(path: str | os.PathLike, x: str = "auto", name: str | None = None) -> RunLog:
    """Read one run (see the module docstring for what PATH may be) into a :class:`RunLog`.

    Args:
        x: unit of the validation ``step``: ``"auto"`` keeps what the log has (iterations,
            or epochs for epoch-based runs), ``"iter"`` converts epochs to iterations
            (estimated from the training lines' ``epoch``), ``"epoch"`` converts training
            steps to fractional epochs.
        name: the run's name in tables and plots (default: the run folder's name).
    """
    if x not in X_CHOICES:
        raise SegrewardError(f"x={x!r} is not one of {X_CHOICES}")
    kind, sources = find_sources(path)
    notes: list[str] = []
    if kind == "tensorboard":
        from segreward.runlog.tensorboard import read_event_dirs

        loss, metrics = read_event_dirs(sources, notes)
    else:
        train, val = [], []
        for src in sources:
            t, v = parse_scalars(src, notes)
            train += t
            val += v
        loss = _last_per_step(_frame(merge_steps(train), notes, "training", path))
        metrics = _last_per_step(_frame(merge_steps(val), notes, "validation", path))
    if loss.empty and metrics.empty:
        raise SegrewardError(f"{path}: the run log holds no scalars")
    run = RunLog(name=name or _run_name(Path(path)), loss=loss, metrics=metrics,
                 sources=[str(s) for s in sources], notes=notes)
    run.by_epoch = _detect_by_epoch(loss, metrics)
    run.x = "epoch" if run.by_epoch else "iter"
    if run.by_epoch:
        run.iters_per_epoch = _iters_per_epoch(loss)
        ipe = f"~{run.iters_per_epoch:g} iterations per epoch" if run.iters_per_epoch else "iterations per epoch unknown"
        _note(notes, f"{path}: epoch-based run: validation 'step' is the epoch ({ipe})")
    if x == "iter" and run.by_epoch:
        if not run.iters_per_epoch:
            raise SegrewardError(f"{path}: cannot convert epochs to iterations: the training "
                                 "lines carry no 'epoch'; use --x epoch (or auto)")
        m = run.metrics.rename(columns={"step": "epoch"})
        m.insert(0, "step", (m["epoch"] * run.iters_per_epoch).round().astype("int64"))
        run.metrics, run.x = m, "iter"
    elif x == "epoch" and not run.by_epoch:
        ipe = _iters_per_epoch(loss)
        if "epoch" not in loss.columns or not ipe:
            raise SegrewardError(f"{path}: iteration-based run (no 'epoch' in the training "
                                 "lines); use --x iter (or auto)")
        run.iters_per_epoch = ipe
        run.metrics = run.metrics.assign(step=run.metrics["step"] / ipe)
        run.x = "epoch"
    if x == "epoch" and run.iters_per_epoch:
        lo = run.loss.rename(columns={"step": "iter"}) if "iter" not in run.loss.columns else run.loss.drop(columns="step").copy()
        lo.insert(0, "step", run.loss["step"] / run.iters_per_epoch)
        run.loss = lo
    return run


def load_runs(paths, x: str = "auto") -> list[RunLog]:
    """:func:`load_run` for each path; runs with the same folder name get a suffix."""
    runs = [load_run(p, x=x) for p in paths]
    seen: dict[str, int] = {}
    for r in runs:
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            r.name = f"{r.name}-{n + 1}"
    return runs
