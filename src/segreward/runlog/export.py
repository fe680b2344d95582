"""Write a run's tables as ``loss.csv`` and ``metrics.csv``."""

from __future__ import annotations

import os
from pathlib import Path

from segreward.errors import SegrewardError
from segreward.runlog.reader import RunLog, load_runs


def write_csvs(run: RunLog, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.csv`` (training keys) and ``metrics.csv`` (validation keys) into
    ``out_dir``; returns the paths written. Missing and NaN values are empty cells;
    infinities are ``inf``/``-inf``."""
    from segreward.outputs import atomic_write_text, check_output_file, ensure_dir

    out = ensure_dir(out_dir, "--out")
    paths = [check_output_file(out / name, "--out", inputs=run.sources) for name in ("loss.csv", "metrics.csv")]
    try:
        atomic_write_text(paths[0], run.loss.to_csv(index=False))
        atomic_write_text(paths[1], run.metrics.to_csv(index=False))
    except OSError as e:
        raise SegrewardError(f"{out}: cannot write the CSV files ({e})") from e
    return paths


def clean_logs(paths, out_dir: str | os.PathLike, x: str = "auto") -> list[tuple[RunLog, list[Path]]]:
    """Read each PATH as one run and write its CSVs: into ``out_dir`` for a single run, into
    ``out_dir/<run name>/`` for several. Returns ``[(run, written paths), ...]``."""
    paths = list(paths)
    if not paths:
        raise SegrewardError("no run given; pass a scalars.json, a run folder or a work_dir")
    runs = load_runs(paths, x=x)
    if len(runs) == 1:
        return [(runs[0], write_csvs(runs[0], out_dir))]
    return [(r, write_csvs(r, Path(out_dir) / r.name)) for r in runs]
