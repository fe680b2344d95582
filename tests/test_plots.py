"""smooth() against TensorBoard's published test vectors (classicSmoothing spec in
tensorboard/webapp/widgets/line_chart_v2/data_transformer_test.ts) and a plain-Python
re-statement of the EMA; regression against the closed-form least-squares slope; figures
rendered and checked non-empty."""

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from segreward.cli import main
from segreward.errors import SegrewardError
from segreward.plots import Trend, plot_logs, plot_runs, regression, smooth, summarize, trend_at
from segreward.runlog import load_run


def test_smooth_tensorboard_vectors():
    np.testing.assert_allclose(smooth([1, 0.5, 0], 0.6), [1, 0.6875, 0.336734693877551])
    np.testing.assert_allclose(smooth([0, 0.5, 1], 0.6), [0, 0.3125, 0.663265306122449])
    out = smooth([-math.inf, 1, math.nan, math.inf, 0.5], 0.6)  # non-finite pass through
    assert out[0] == -math.inf and math.isnan(out[2]) and out[3] == math.inf
    np.testing.assert_allclose(out[[1, 4]], [1, 0.6875])
    assert smooth([0.3, 0.3, 0.3], 0.1).tolist() == [0.3, 0.3, 0.3]  # no float noise
    assert smooth([1, 0.5], 0).tolist() == [1, 0.5]
    assert smooth([], 0.6).size == 0


def test_smooth_matches_a_plain_debiased_ema():
    rng = np.random.default_rng(0)
    v = rng.normal(size=50)
    w = 0.9
    ema, ref = 0.0, []
    for n, x in enumerate(v, start=1):
        ema = w * ema + (1 - w) * x
        ref.append(ema / (1 - w**n))
    np.testing.assert_allclose(smooth(v, w), ref)
    assert smooth(v, w)[0] == v[0]


@pytest.mark.parametrize("w", [-0.1, 1.0, 2.0, math.nan])
def test_smooth_rejects_weights_outside_0_1(w):
    with pytest.raises(SegrewardError, match="smoothing weight"):
        smooth([1.0, 2.0], w)


def test_regression_and_trend():
    x = np.array([0, 1000, 2000, 3000, 4000.0])
    y = 40 + 0.002 * x + np.array([0.1, -0.1, 0.0, 0.1, -0.1])
    slope, icpt = regression(x, y)
    xm, ym = x.mean(), y.mean()
    ref = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    assert slope == pytest.approx(ref) and icpt == pytest.approx(ym - ref * xm)
    assert math.isnan(regression([5], [1])[0])
    t = Trend.parse("0,40,4000,48")
    np.testing.assert_allclose(trend_at([0, 2000, 4000], trend=t), [40, 44, 48])
    np.testing.assert_allclose(trend_at([500, 5000], reference=([0, 1000], [10, 20])), [15, np.nan])
    with pytest.raises(SegrewardError, match="four numbers"):
        Trend.parse("1,2,3")


def write_run(path, miou_fn, steps=range(100, 2001, 100), val_every=500):
    path.mkdir(parents=True)
    with open(path / "scalars.json", "w") as f:
        for s in steps:
            f.write(json.dumps({"lr": 0.01, "loss": 1 / (1 + s / 300), "iter": s, "step": s}) + "\n")
            if s % val_every == 0:
                f.write(json.dumps({"aAcc": 80.0, "mIoU": miou_fn(s), "step": s}) + "\n")
    return path


def test_summary_against_hand_computed_values(tmp_path):
    run = write_run(tmp_path / "a", lambda s: 40 + s / 100)  # 45, 50, 55, 60
    t = summarize([run], trend=Trend(0, 44, 2000, 64))  # trend: 49, 54, 59, 64
    row = t.iloc[0]
    assert (row.best, row.best_step, row["last"], row.last_step) == (60, 2000, 60, 2000)
    assert row.slope == pytest.approx(10.0)  # 0.01 per step = 10 per 1k steps
    assert row.mean_gap == pytest.approx(-4.0) and row.above_share == 0 and row.above_at == "-"
    ref = write_run(tmp_path / "ref", lambda s: 100 - s / 50)  # 90, 80, 70, 60
    row = summarize([run], reference=ref).iloc[0]
    assert row.mean_gap == pytest.approx(np.mean([45 - 90, 50 - 80, 55 - 70, 60 - 60]))
    crossing = write_run(tmp_path / "c", lambda s: {500: 50, 1000: 40, 1500: 60, 2000: 70}[s])
    row = summarize([crossing], trend=Trend(0, 45, 2000, 45)).iloc[0]
    assert row.above_at == "500, 1500-2000" and row.above_share == 0.75


def test_unknown_metric_lists_the_available_ones(tmp_path):
    run = write_run(tmp_path / "a", lambda s: 40.0)
    with pytest.raises(SegrewardError, match=r"no validation metric 'mDice'.*'aAcc', 'mIoU'"):
        summarize([run], metric="mDice")


def test_plot_renders_non_empty_png(tmp_path):
    a = write_run(tmp_path / "a", lambda s: 40 + s / 100 + math.sin(s))
    b = write_run(tmp_path / "b", lambda s: 42 + s / 200)
    fig = plot_runs([load_run(a), b], trend=Trend(0, 41, 2000, 55), smoothing=0.6)
    assert len(fig.axes) == 2
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("per 1k steps" in lab for lab in labels) and "trend to beat" in labels
    out = tmp_path / "fig.png"
    fig.savefig(out)
    from PIL import Image

    with Image.open(out) as im:
        arr = np.asarray(im.convert("L"))
    assert out.stat().st_size > 10_000 and arr.std() > 5  # something was drawn


def test_cli_plot_and_clean(tmp_path, capsys):
    a = write_run(tmp_path / "a", lambda s: 40 + s / 100)
    ref = write_run(tmp_path / "ref", lambda s: 41 + s / 200)
    assert main(["logs", "plot", str(a), "--reference", str(ref), "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "mean_gap" in out and (tmp_path / "p.png").stat().st_size > 10_000
    assert (tmp_path / "p_summary.csv").exists()
    assert main(["logs", "clean", str(a), "--out", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "loss.csv").exists()
    assert main(["logs", "plot", str(a), "--trend", "1,2", "--out", str(tmp_path / "q.png")]) == 2
    assert "four numbers" in capsys.readouterr().err


def _loss_tick_labels(tmp_path, name, losses):
    path = tmp_path / name
    path.mkdir()
    with open(path / "scalars.json", "w") as f:
        for i, v in enumerate(losses, 1):
            f.write(json.dumps({"lr": 0.01, "loss": v, "step": 10 * i}) + "\n")
        f.write(json.dumps({"mIoU": 50.0, "step": 10 * len(losses)}) + "\n")
    fig = plot_runs([path], smoothing=0)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    lax = fig.axes[1]
    labels = [t.get_text().replace("\u2212", "-") for t in lax.get_yticklabels() if t.get_text()]
    lo, hi = lax.get_ylim()
    visible = [t for t, v in zip(lax.get_yticklabels(), lax.get_yticks()) if lo <= v <= hi and t.get_text()]
    return lax.get_yscale(), labels, len(visible)


@pytest.mark.parametrize("losses,scale", [
    (list(np.linspace(0.5, 0.3, 20)), "linear"),  # within a decade: no lone "3x10^-1" minor labels
    (list(np.linspace(-0.02, 0.01, 20)), "linear"),  # a reward loss around zero
    (list(np.geomspace(2.0, 0.01, 20)), "log"),  # over two decades
])
def test_loss_axis_has_readable_ticks(tmp_path, losses, scale):
    got_scale, labels, visible = _loss_tick_labels(tmp_path, "r", losses)
    assert got_scale == scale
    assert visible >= 2  # at least two labelled values in view
    for text in labels:  # plain numbers: no mathtext (10^x), no offset or scale factor
        float(text)
        assert "$" not in text and "e" not in text.lower()
