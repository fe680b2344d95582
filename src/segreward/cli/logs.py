"""``segreward logs``: clean run logs into CSV files, plot metric curves against a trend."""

from __future__ import annotations

import argparse
import sys
import warnings

from segreward.runlog.reader import X_CHOICES

_X_HELP = ("x axis unit: auto (as logged: iterations, or epochs for epoch-based runs), "
           "iter (convert validation epochs to iterations), epoch")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "logs", help="experiment logs (mmengine scalars.json, TensorBoard): CSV export and plots",
        description="Read mmengine/MMSegmentation or segreward run logs (scalars.json, "
                    "TensorBoard events). PATH: a scalars.json, a vis_data folder, a run folder "
                    "or an mmengine work_dir with several timestamp folders (a resumed run).")
    sub = p.add_subparsers(dest="logs_command", metavar="ACTION", required=True)

    c = sub.add_parser("clean", help="write loss.csv (training keys) and metrics.csv (validation keys)")
    c.add_argument("paths", nargs="+", metavar="PATH", help="run(s) to read; one run per PATH")
    c.add_argument("--out", required=True, help="output folder (one subfolder per run if several)")
    c.add_argument("--x", choices=X_CHOICES, default="auto", help=_X_HELP)
    c.set_defaults(func=_clean)

    q = sub.add_parser("plot", help="metric curves with smoothing, regression and a trend to beat")
    q.add_argument("paths", nargs="+", metavar="PATH", help="run(s) to plot")
    q.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
    q.add_argument("--metric", default="mIoU", help="validation metric to plot (default: mIoU)")
    q.add_argument("--smoothing", type=float, default=0.6,
                   help="TensorBoard smoothing weight in [0, 1) (default: 0.6; 0 = none)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--reference", metavar="RUN", help="a reference run to beat (same PATH forms)")
    g.add_argument("--trend", metavar="X0,Y0,X1,Y1", help="a straight trend line to beat")
    q.add_argument("--x", choices=X_CHOICES, default="auto", help=_X_HELP)
    q.add_argument("--summary", metavar="CSV", help="summary table file (default: <out>_summary.csv)")
    q.set_defaults(func=_plot)


def _print_notes(caught) -> None:
    for w in caught:
        print(f"segreward logs: warning: {w.message}", file=sys.stderr)


def _clean(args: argparse.Namespace) -> int:
    from segreward.runlog import clean_logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = clean_logs(args.paths, args.out, x=args.x)
    _print_notes(caught)
    for run, paths in results:
        metrics = ", ".join(run.metric_names) or "none"
        axis = f"validation step = {run.x}" + (" (epoch-based run)" if run.by_epoch else "")
        print(f"{run.name}: {len(run.loss)} training steps, {len(run.metrics)} validation steps "
              f"[{metrics}], {axis}, from {len(run.sources)} file(s)")
        for p in paths:
            print(f"  wrote {p}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from segreward.plots import plot_logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table, paths = plot_logs(args.paths, args.out, metric=args.metric, smoothing=args.smoothing,
                                 trend=args.trend, reference=args.reference, x=args.x,
                                 summary_path=args.summary)
    _print_notes(caught)
    with_opts = {"float_format": lambda v: f"{v:.4g}", "index": False}
    print(table.to_string(**with_opts))
    for p in paths:
        print(f"wrote {p}")
    return 0
