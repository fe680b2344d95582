"""Every reward-tuning method of ``segreward demo`` against extra CE, at the demo's budget.

    PYTHONPATH=src python benchmarks/demo_methods.py --seeds 0 1 2

Per seed: the demo's shared stages once (source only, CE fine-tuned, + extra CE), then the
last stage once per method of ``segreward.demo.METHODS``, all from the same CE fine-tuned
checkpoint with the same budget. Prints and writes (``--out``, default
``benchmarks/results/demo_methods.{json,md}``) target and source mIoU per method with the
seed-paired difference to extra CE; ``segreward demo``'s default method is chosen from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from segreward.demo import METHODS, DemoSettings, run_reward_stage, run_seed


def _mean_std(v):
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", default="runs/demo_methods")
    p.add_argument("--quick", action="store_true", help="the demo's tiny settings (for tests)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "demo_methods"))
    args = p.parse_args(argv)
    s = DemoSettings.quick() if args.quick else DemoSettings()
    t0 = time.perf_counter()
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        work = Path(args.work) / f"seed{seed}"
        per_seed[seed] = run_seed(work, s, seed, progress=False, with_reward=False)
        for m in args.methods:
            per_seed[seed][m] = run_reward_stage(work, s, seed, m, name=f"method_{m}", progress=False)[f"method_{m}"]
            print(f"seed {seed} {m:18s} target {per_seed[seed][m]['target']['mIoU']:6.2f}  extra CE "
                  f"{per_seed[seed]['extra_ce']['target']['mIoU']:6.2f}", flush=True)
    rows = []
    for m in ["ce_finetuned", "extra_ce", *args.methods]:
        row = {"method": m}
        for dom in ("target", "source"):
            vals = [per_seed[sd][m][dom]["mIoU"] for sd in args.seeds]
            row[f"{dom}_mean"], row[f"{dom}_std"] = _mean_std(vals)
            if m in METHODS:
                d = [per_seed[sd][m][dom]["mIoU"] - per_seed[sd]["extra_ce"][dom]["mIoU"] for sd in args.seeds]
                row[f"{dom}_diff_mean"], row[f"{dom}_diff_std"] = _mean_std(d)
                row[f"{dom}_diffs"] = [round(x, 3) for x in d]
        rows.append(row)
    runtime = time.perf_counter() - t0
    cmd = "python benchmarks/demo_methods.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    lines = ["# Demo methods vs extra CE", "", f"Command: `{cmd}` — {runtime / 60:.1f} min; seeds {args.seeds}; "
             f"{s.extra_iters} iterations of batch {s.batch_size} from the same CE fine-tuned checkpoint.", "",
             "| method | target mIoU | Δ target vs extra CE (seed-paired) | source mIoU | Δ source |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        dt = f"{r['target_diff_mean']:+.2f} ± {r['target_diff_std']:.2f}" if "target_diff_mean" in r else ""
        ds = f"{r['source_diff_mean']:+.2f} ± {r['source_diff_std']:.2f}" if "source_diff_mean" in r else ""
        lines.append(f"| {r['method']} | {r['target_mean']:.2f} ± {r['target_std']:.2f} | {dt} | "
                     f"{r['source_mean']:.2f} ± {r['source_std']:.2f} | {ds} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": cmd, "runtime_s": runtime, "seeds": args.seeds, "rows": rows, "per_seed": per_seed,
              "settings": s.__dict__}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=list))
    out.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
