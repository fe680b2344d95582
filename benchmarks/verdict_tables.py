"""The README's compact verdict tables, rendered from a result file of ``benchmarks/da.py``.

    python benchmarks/verdict_tables.py results/verdict_camvid_idd.json                # every section
    python benchmarks/verdict_tables.py results/verdict_camvid_idd.json --budget 256   # one budget

Per (protocol, budget): each method at its chosen lr with and without calibration, the
seed-paired Δ vs the protocol's reference (extra CE; pseudo-label self-training in uda) and,
calibrated, vs the reference + calibration (like for like), with a 95% t-interval; then calibration's own effect per method (the same model with and without its
offsets, seed-paired), and the issue's goal as ``da.py`` judged it. Every number comes from the
file, so a table in the README is reproduced by this command.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from da import CAL, CROSS, STARTS, LABELLED, UDA, _ci, _sections, paired, read_result  # noqa: E402

NAMES = {"source_only": "source only", "ce_finetuned": "CE fine-tuned start (no extra steps)", "ce": "extra CE",
         "lovasz": "Lovász", "ce_lovasz": "CE + Lovász 1:1",
         "local_batch": "reward tuning, exact credit of the batch mIoU (`local_batch`)",
         "local_batch_ce": "the same with a CE anchor (`local_batch_ce`)",
         "self_training": "pseudo-label self-training", "local_pseudo_batch": "reward tuning on pseudo-labels"}
ORDER = list(STARTS) + LABELLED + UDA


def _lr(row) -> str:
    return "—" if row is None or row["lr"] is None else f"{row['lr']:g}"


def _mean_ci(mean: float, ci) -> str:
    """``+1.23 [+0.80, +1.66]``, or ``+1.23`` where there is no interval (one seed)."""
    return f"{mean:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _goal_part(d: dict | None) -> str:
    """One comparison of a goal entry of ``da.py``'s summary (``mean``, ``ci95``, ``n``)."""
    return "—" if not d else f"{_mean_ci(d['mean'], d['ci95'])} (n={d['n']})"


def section(summary: dict, runs: list[dict], protocol: str, budget) -> str:
    rows = {r["method"]: r for r in summary["rows"] if r["protocol"] == protocol and r["budget"] == budget}
    ref = "ce" if protocol != "uda" else "self_training"
    # the protocol's reference: extra CE, self-training without labels, or (semi) CE on the labels
    # and the pseudo-labels; semi is also set against after_ce's extra CE, which uses the labels alone
    name = NAMES[ref] if protocol != "semi" else "CE on labels + pseudo-labels"
    other = CROSS.get(protocol)  # the protocol of the labels-alone baselines
    cross = f"{other}:ce" if other else None
    extra = (" Δ vs extra CE (labels alone) [95%] | Δ vs extra CE + cal [95%] | Δ vs the same method on the labels "
             "alone [95%] | the same, calibrated [95%] |") if cross else ""
    lines = [f"| method (chosen lr; with cal) | n | target mIoU | Δ vs {name} [95%] | + calibration | "
             f"Δ vs {name} + cal [95%] |" + extra, "| --- " * (6 + 4 * bool(cross)) + "|"]
    names = {**NAMES, "ce": name} if protocol == "semi" else NAMES  # semi's ce is not extra CE on the labels
    for m in [m for m in ORDER if m in rows]:
        r, rc = rows[m], rows.get(m + CAL)
        lr = _lr(r) if rc is None or rc["lr"] == r["lr"] else f"{_lr(r)}; {_lr(rc)} with cal"
        vs = r["vs"].get(ref)
        vsc = rc["vs"].get(ref + CAL) if rc else None
        cal = f"{rc['target_mean']:.2f} ± {rc['target_std']:.2f}" if rc else ""
        more = ""
        if cross:
            xs, xc = r["vs"].get(cross), rc["vs"].get(cross + CAL) if rc else None
            ss, sc = r["vs"].get(f"{other}:{m}"), rc["vs"].get(f"{other}:{m}{CAL}") if rc else None
            more = " " + " | ".join(_ci(d) if d else "" for d in (xs, xc, ss, sc)) + " |"
        lines.append(f"| {names.get(m, m)} ({lr}) | {r['n']} | {r['target_mean']:.2f} ± {r['target_std']:.2f} | "
                     f"{_ci(vs) if vs else ''} | {cal} | {_ci(vsc) if vsc else ''} |" + more)
    # calibration's own effect: the same model (the method at its calibrated pipeline's lr) with and
    # without its offsets
    by = {}
    for x in runs:
        if x["protocol"] == protocol and x.get("budget") == budget:
            by[(x["method"], x.get("lr"), x["seed"])] = x["target_mIoU"]
    effects = []
    for m in [m for m in ORDER if m + CAL in rows]:
        rc = rows[m + CAL]
        seeds = [s for s in rc["seeds"] if (m, rc["lr"], s) in by and (m + CAL, rc["lr"], s) in by]
        if seeds:
            d = paired([by[(m + CAL, rc["lr"], s)] - by[(m, rc["lr"], s)] for s in seeds])
            effects.append(f"{names.get(m, m)} {_mean_ci(d['diff_mean'], d['ci95'])}" +
                           ("" if d["ci95"] else f" (n={len(seeds)})"))
    out = "\n".join(lines)
    if effects:
        out += "\n\nCalibration itself (each method at its calibrated pipeline's lr, with vs without offsets, seed-paired, 95%): " + "; ".join(effects) + "."
    for g in summary.get("goals", []):
        if g["protocol"] == protocol and g["budget"] == budget:
            out += (f"\n\nGoal ({g['criterion']}): best reward pipeline by selection mIoU `{g['best']}` at "
                    f"{_lr(g)}: vs extra CE {_goal_part(g['vs_ce'])}, vs Lovász {_goal_part(g['vs_lovasz'])}; "
                    f"like for like vs extra CE + cal {_goal_part(g['vs_ce_cal'])}, vs Lovász + cal "
                    f"{_goal_part(g['vs_lovasz_cal'])}"
                    + (f"; vs the same budget of CE on labels + pseudo-labels {_goal_part(g['vs_semi_ce'])}, "
                       f"calibrated {_goal_part(g['vs_semi_ce+cal'])}" if "vs_semi_ce" in g else "")
                    + f": **{'met' if g['met'] else 'not met'}**.")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="a JSON written by benchmarks/da.py (a run or --merge)")
    p.add_argument("--protocol", default=None, help="only this protocol")
    p.add_argument("--budget", type=int, default=None, help="only this label budget")
    args = p.parse_args(argv)
    data = read_result(args.result)  # the .json suffix as da.py's --out and --merge leave it off
    summary, runs = data["summary"], data["runs"]
    for protocol, budget in _sections(summary):  # the order of da.py's own report
        if (args.protocol and protocol != args.protocol) or (args.budget is not None and budget != args.budget):
            continue
        print(f"### {protocol}, budget {budget}\n")
        # typographic minus in numbers, as the README writes them
        print(re.sub(r"(?<![\w`])-(?=\d)", "\u2212", section(summary, runs, protocol, budget)) + "\n")


if __name__ == "__main__":
    main()
