"""Plots of run logs: metric curves with TensorBoard smoothing, regression, a trend to beat.

The math is in small functions (:func:`smooth`, :func:`regression`, :func:`trend_at`,
:func:`summarize`); :func:`plot_runs` draws with them and returns a matplotlib ``Figure``
(no pyplot state, so it is safe in scripts, tests and notebooks alike).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segreward.errors import SegrewardError


# ---------------------------------------------------------------- math


def smooth(values, weight: float = 0.6) -> np.ndarray:
    """TensorBoard's scalar smoothing: a debiased exponential moving average.

    Same results as TensorBoard's ``classicSmoothing``: ``last = last * w + (1 - w) * v`` from
    ``last = 0``, divided by ``1 - w ** n`` (n = finite values seen so far), so the first
    finite point equals the raw value. Non-finite values (NaN, +-inf) are passed through and
    skipped by the average; a series whose values all equal the first is returned unchanged
    (no floating-point noise). ``weight=0`` returns the values.

    Args:
        values: 1-d sequence of numbers.
        weight: in [0, 1). (TensorBoard's slider stops at 0.999; at 1 it would draw 0.)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise SegrewardError(f"smooth: expected a 1-d series, got shape {v.shape}")
    w = float(weight)
    if not 0.0 <= w < 1.0:
        raise SegrewardError(f"smoothing weight {weight!r} is outside [0, 1); TensorBoard's "
                             "default is 0.6, 0 means no smoothing")
    if v.size == 0 or w == 0.0 or np.all(v == v[0]):
        return v.copy()
    out = v.copy()
    last, n = 0.0, 0
    for i, x in enumerate(v.tolist()):
        if not math.isfinite(x):
            continue
        last = last * w + (1.0 - w) * x
        n += 1
        out[i] = last / (1.0 - w**n)
    return out


def regression(steps, values) -> tuple[float, float]:
    """Least-squares line ``values ~ slope * steps + intercept`` over the finite points;
    ``(nan, nan)`` with fewer than two distinct steps."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


@dataclass(frozen=True)
class Trend:
    """A straight line through ``(x0, y0)`` and ``(x1, y1)``: the trend to beat."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def parse(cls, text: str) -> "Trend":
        """From ``"x0,y0,x1,y1"`` (the ``--trend`` option)."""
        try:
            x0, y0, x1, y1 = (float(t) for t in text.split(","))
        except ValueError:
            raise SegrewardError(f"--trend {text!r}: expected four numbers x0,y0,x1,y1, "
                                 "e.g. --trend 0,50.1,40000,58.3") from None
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise SegrewardError(f"--trend {text!r}: the four numbers must be finite (no nan or inf)")
        if x0 == x1:
            raise SegrewardError(f"--trend {text!r}: x0 and x1 must differ")
        return cls(x0, y0, x1, y1)

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        return self.y0 + (x - self.x0) * (self.y1 - self.y0) / (self.x1 - self.x0)


def trend_at(steps, trend=None, reference=None) -> np.ndarray:
    """The value to beat at each step: the :class:`Trend` line, or the ``reference`` curve
    (``(steps, values)``) linearly interpolated; NaN outside the reference's step range."""
    x = np.asarray(steps, dtype=np.float64)
    if trend is not None:
        return trend(x)
    if reference is not None:
        rx, ry = (np.asarray(a, dtype=np.float64) for a in reference)
        ok = np.isfinite(rx) & np.isfinite(ry)
        rx, ry = rx[ok], ry[ok]
        if rx.size == 0:
            return np.full(x.shape, np.nan)
        return np.where((x >= rx.min()) & (x <= rx.max()), np.interp(x, rx, ry), np.nan)
    return np.full(x.shape, np.nan)


def _ranges(steps, mask) -> str:
    """Steps where mask holds, as ``"2000-6000, 9000"``."""
    out, start, prev = [], None, None
    for s, m in zip(steps, mask):
        if m and start is None:
            start = s
        if not m and start is not None:
            out.append((start, prev))
            start = None
        prev = s
    if start is not None:
        out.append((start, prev))
    return ", ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in out) or "-"


# ---------------------------------------------------------------- runs


def _as_run(run, x):
    from segreward.runlog import RunLog, load_run

    return run if isinstance(run, RunLog) else load_run(run, x=x)


def _series(run, metric: str):
    if metric not in run.metrics.columns:
        raise SegrewardError(f"run {run.name!r} ({run.sources[0] if run.sources else '?'}) has "
                             f"no validation metric {metric!r}; it has {run.metric_names}")
    m = run.metrics[["step", metric]].dropna(subset=[metric])
    return m["step"].to_numpy(np.float64), m[metric].to_numpy(np.float64)


def _slope_scale(run) -> tuple[float, str]:
    return (1.0, "per epoch") if run.x == "epoch" else (1000.0, "per 1k steps")


def summarize(runs, metric: str = "mIoU", trend: Trend | None = None, reference=None,
              x: str = "auto") -> pd.DataFrame:
    """One row per run: best value and its step, last value and step, regression slope
    (per 1k steps; per epoch for epoch axes), and -- when a trend or reference is given --
    the mean gap to it (run minus trend, over the steps where both exist), the share of
    validation points above it and the step ranges where the run is above."""
    runs = [_as_run(r, x) for r in runs]
    ref = _as_run(reference, x) if reference is not None else None
    ref_xy = _series(ref, metric) if ref is not None else None
    rows = []
    for run in runs:
        s, v = _series(run, metric)
        scale, unit = _slope_scale(run)
        slope, _ = regression(s, v)
        row = {"run": run.name, "metric": metric, "points": int(np.isfinite(v).sum())}
        fin = np.isfinite(v)
        if fin.any():
            i = int(np.nanargmax(np.where(fin, v, -np.inf)))
            row.update(best=v[i], best_step=s[i], last=v[fin][-1], last_step=s[fin][-1])
        else:
            row.update(best=np.nan, best_step=np.nan, last=np.nan, last_step=np.nan)
        row["slope"] = slope * scale
        row["slope_unit"] = unit
        if trend is not None or ref_xy is not None:
            t = trend_at(s, trend, ref_xy)
            both = np.isfinite(t) & fin
            gap = v[both] - t[both]
            row["mean_gap"] = float(gap.mean()) if gap.size else np.nan
            row["above_share"] = float((gap > 0).mean()) if gap.size else np.nan
            row["above_at"] = _ranges(s[both], gap > 0) if gap.size else "-"
        rows.append(row)
    table = pd.DataFrame(rows)
    for c in ("best_step", "last_step"):
        col = table[c]
        if col.notna().all() and (col == col.round()).all():
            table[c] = col.astype("int64")
    return table


def plot_runs(runs, metric: str = "mIoU", smoothing: float = 0.6, trend: Trend | None = None,
              reference=None, loss_key: str = "loss", x: str = "auto", title: str | None = None):
    """Metric curves (top) and smoothed training loss (bottom) for one or several runs.

    Per run: the raw metric as faint points and line, the TensorBoard-smoothed curve over it,
    and the least-squares line with its slope in the legend. ``trend`` (a :class:`Trend`) or
    ``reference`` (a run or run path) is drawn in black, and where a run is above it the gap
    is shaded. Returns a ``matplotlib.figure.Figure``; save it with ``fig.savefig(path)``.
    """
    from matplotlib.figure import Figure

    runs = [_as_run(r, x) for r in runs]
    if not runs:
        raise SegrewardError("plot_runs: no run given")
    ref = _as_run(reference, x) if reference is not None else None
    ref_xy = _series(ref, metric) if ref is not None else None
    has_loss = any(loss_key in r.loss.columns for r in runs)
    fig = Figure(figsize=(9, 7.5 if has_loss else 4.8), layout="constrained")
    axes = fig.subplots(2 if has_loss else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, c in zip(runs, colors):
        s, v = _series(run, metric)
        scale, unit = _slope_scale(run)
        ax.plot(s, v, "o-", color=c, alpha=0.3, ms=4, lw=1)
        ax.plot(s, smooth(v, smoothing), "-", color=c, lw=2, label=run.name)
        slope, icpt = regression(s, v)
        if math.isfinite(slope):
            xs = np.array([s.min(), s.max()])
            ax.plot(xs, slope * xs + icpt, "--", color=c, lw=1,
                    label=f"{run.name} fit: {slope * scale:+.3g} {metric} {unit}")
        if trend is not None or ref_xy is not None:
            t = trend_at(s, trend, ref_xy)
            above = np.isfinite(t) & np.isfinite(v) & (v > t)
            if above.any():
                ax.fill_between(s, t, v, where=above, interpolate=True, color=c, alpha=0.15,
                                label=f"{run.name} above {'trend' if trend else 'reference'}")
    if trend is not None:
        lo = min([trend.x0] + [r.metrics["step"].min() for r in runs])
        hi = max([trend.x1] + [r.metrics["step"].max() for r in runs])
        xs = np.array([lo, hi], dtype=np.float64)
        ax.plot(xs, trend(xs), "k--", lw=1.5, label="trend to beat")
    if ref is not None:
        rs, rv = ref_xy
        ax.plot(rs, rv, "k.-", lw=1.5, alpha=0.8, label=f"reference: {ref.name}")
    xlabel = "epoch" if all(r.x == "epoch" for r in runs) else "iteration"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} (smoothing {smoothing:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_loss:
        lax = axes[1]
        shown = []
        for run, c in zip(runs, colors):
            if loss_key not in run.loss.columns:
                continue
            d = run.loss[["step", loss_key]].dropna()
            lv = d[loss_key].to_numpy(np.float64)
            shown.append(lv[np.isfinite(lv)])
            lax.plot(d["step"], lv, "-", color=c, alpha=0.25, lw=0.8)
            lax.plot(d["step"], smooth(lv, smoothing), "-", color=c, lw=1.5, label=run.name)
        _loss_axis(lax, np.concatenate(shown) if shown else np.zeros(0))
        lax.set_xlabel("epoch" if all(r.x == "epoch" for r in runs) and runs[0].iters_per_epoch else "iteration")
        lax.set_ylabel(f"training {loss_key}")
        lax.set_title(f"training {loss_key} (smoothing {smoothing:g})")
        lax.grid(alpha=0.3)
        lax.legend(fontsize=8)
    return fig


def plot_logs(paths, out: str | os.PathLike, metric: str = "mIoU", smoothing: float = 0.6,
              trend: Trend | str | None = None, reference=None, x: str = "auto",
              summary_path: str | os.PathLike | None = None, dpi: int = 120):
    """Load runs, draw :func:`plot_runs` into ``out`` and save :func:`summarize` as CSV
    (default: ``<out stem>_summary.csv``). Returns ``(summary DataFrame, [files written])``."""
    from pathlib import Path

    from segreward.runlog import load_runs

    if isinstance(trend, str):
        trend = Trend.parse(trend)
    if trend is not None and reference is not None:
        raise SegrewardError("give either a reference run or a trend line, not both")
    from segreward.outputs import atomic_save, atomic_write_text, check_output_file, same_file

    runs = load_runs(paths, x=x)
    ref = _as_run(reference, x) if reference is not None else None
    # Both outputs are checked before either is written, and never onto a file that was read.
    inputs = [src for r in runs + ([ref] if ref is not None else []) for src in getattr(r, "sources", [])]
    inputs += [Path(p) for p in paths] + ([Path(reference)] if isinstance(reference, (str, os.PathLike)) else [])
    out = Path(out)
    summary_path = Path(summary_path) if summary_path else out.with_name(out.stem + "_summary.csv")
    out = check_output_file(out, "--out", inputs=inputs)
    if out.suffix.lower().lstrip(".") not in fig_formats():
        raise SegrewardError(f"--out {out}: unknown figure format {out.suffix or '(no suffix)'!r}; "
                             f"use one of: {', '.join('.' + f for f in ('png', 'pdf', 'svg'))}")
    summary_path = check_output_file(summary_path, "--summary", inputs=inputs)
    if out.resolve() == summary_path.resolve() or same_file(out, summary_path):
        raise SegrewardError(f"--summary {summary_path}: is the same file as --out; choose another file")
    fig = plot_runs(runs, metric=metric, smoothing=smoothing, trend=trend, reference=ref)
    table = summarize(runs, metric=metric, trend=trend, reference=ref)
    try:
        atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format=out.suffix.lower().lstrip(".")))
        atomic_write_text(summary_path, table.to_csv(index=False))
    except (OSError, ValueError) as e:
        raise SegrewardError(f"{out}: cannot save the figure or summary ({e})") from e
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return table, [out, summary_path]


def _loss_axis(ax, values: np.ndarray) -> None:
    """A log axis only when the positive losses span more than a decade, with plain-number tick
    labels (0.1, 0.2, 0.5, 1, ...); otherwise linear, without an offset or a 1e-x factor."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    if values.size and (values > 0).all() and values.max() / values.min() > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        ax.yaxis.set_major_formatter(fmt)


def fig_formats() -> set[str]:
    """File suffixes matplotlib can save to (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase
    return set(FigureCanvasBase.get_supported_filetypes())
