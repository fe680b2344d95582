"""Time to clean a 100k-line mmengine scalars.json vs pandas.read_json(lines=True).

    PYTHONPATH=src python benchmarks/logs.py [--lines 100000] [--repeat 3]

Writes a synthetic MMSegmentation-style log (train lines every step, a validation line every
2000 steps) into a temp folder, then times, best of --repeat:
  * pandas:  pandas.read_json(path, lines=True)  (parse only: no train/val split, no cleaning)
  * segreward: segreward.runlog.load_run(path)   (parse, split train/val, last value per step),
    with orjson when installed and again with the standard library's json only
  * segreward clean: load_run + write loss.csv and metrics.csv
and the same on a file with NaN values and a truncated last line, where pandas fails.
Prints a table and writes benchmarks/results/logs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from segreward.runlog import clean_logs, load_run
from segreward.runlog import reader as _reader


def make_log(path: Path, n: int, broken: bool) -> None:
    rnd = random.Random(0)
    with open(path, "w") as f:
        written = 0
        step = 0
        while written < n:
            step += 1
            loss = 1.0 / (1 + step / 5000) + rnd.random() * 0.1
            d = {"lr": 0.01 * (1 - step / (n + 1)) ** 0.9, "data_time": 0.004 + rnd.random() * 1e-3,
                 "loss": float("nan") if broken and step % 997 == 0 else loss,
                 "decode.loss_ce": 0.7 * loss, "decode.acc_seg": 60 + rnd.random() * 30,
                 "aux.loss_ce": 0.3 * loss, "aux.acc_seg": 50 + rnd.random() * 30,
                 "time": 0.4 + rnd.random() * 0.05, "iter": step, "memory": 8493, "step": step}
            f.write(json.dumps(d) + "\n")
            written += 1
            if step % 2000 == 0 and written < n:
                f.write(json.dumps({"aAcc": 90.0 + rnd.random(), "mIoU": 60 + rnd.random() * 10,
                                    "mAcc": 70 + rnd.random() * 10, "data_time": 0.002,
                                    "time": 0.16, "step": step}) + "\n")
                written += 1
        if broken:
            f.write('{"lr": 0.0001, "data_time": 0.00')


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "logs.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for broken in (False, True):
            path = Path(tmp) / ("broken.json" if broken else "clean.json")
            make_log(path, args.lines, broken)
            label = "NaN + truncated last line" if broken else "clean file"
            try:
                t_pd = best_of(lambda: pd.read_json(path, lines=True), args.repeat)
                pd_note = "ok"
            except ValueError as e:
                t_pd, pd_note = None, f"fails: {str(e)[:50]}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_load = best_of(lambda: load_run(path), args.repeat)
                fast = _reader._orjson
                _reader._orjson = None  # the same without the optional orjson package
                t_stdlib = best_of(lambda: load_run(path), args.repeat)
                _reader._orjson = fast
                t_clean = best_of(lambda: clean_logs([path], Path(tmp) / "out"), args.repeat)
                run = load_run(path)
            rows.append({"file": label, "lines": args.lines, "mb": round(path.stat().st_size / 2**20, 1),
                         "pandas_read_json_s": t_pd, "pandas": pd_note,
                         "segreward_load_s": round(t_load, 3), "orjson": _reader._orjson is not None,
                         "segreward_load_stdlib_json_s": round(t_stdlib, 3),
                         "segreward_clean_csv_s": round(t_clean, 3),
                         "ratio_load_vs_pandas": round(t_load / t_pd, 2) if t_pd else None,
                         "ratio_stdlib_vs_pandas": round(t_stdlib / t_pd, 2) if t_pd else None,
                         "train_rows": len(run.loss), "val_rows": len(run.metrics)})
            if t_pd:
                rows[-1]["pandas_read_json_s"] = round(t_pd, 3)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"PYTHONPATH=src python benchmarks/logs.py --lines {args.lines} --repeat {args.repeat}",
                               "python": platform.python_version(), "pandas": pd.__version__,
                               "machine": platform.machine(), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
