"""``segreward demo``: pretrain on synthetic day scenes, adapt to dusk, compare extra CE with
reward tuning at the same budget, and write a report."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on embedded synthetic data (no download; a few CPU-minutes, see the README)",
                       description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (mean ± std when several)")
    p.add_argument("--method", default=None, help="reward-tuning method of the last stage (default: the best "
                   "measured one); one of: " + ", ".join(_methods()))
    p.add_argument("--quick", action="store_true", help="a tiny variant for tests (about 1 CPU-minute; its numbers mean nothing)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); the same seeds and "
                   "threads give the same numbers, another thread count can change the later digits")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _methods() -> list[str]:
    from segreward.demo import METHODS
    return list(METHODS)


def run(args) -> int:
    from segreward.demo import DEFAULT_METHOD, run_demo

    result = run_demo(args.out, seeds=args.seeds, quick=args.quick, progress=not args.no_progress,
                      method=args.method or DEFAULT_METHOD, threads=args.threads)
    print(result["table"])
    print()
    print(result["next"])
    print(f"report: {result['report']}  ({result['runtime_s'] / 60:.1f} min wall, {result['cpu_s'] / 60:.1f} CPU-min, "
          f"{result['threads']} thread(s))")
    return 0
