"""Throughput of `segreward stats freq` counting vs decoding alone and a naive per-class loop.

    PYTHONPATH=src python benchmarks/stats.py [--folders DIR [DIR ...]] [--repeat 3]

On a folder of PNG label maps (default: the CamVid annotations in ../shared/data/camvid,
trainannot + valannot, 468 maps of 480x360; when they are missing, 300 generated maps of the
same size in a temp folder), times, best of --repeat, in images per second:

  * decode:      segreward.data.io.read_label on every file (the physical limit on one core)
  * naive:       read_label + ``(label == c).sum()`` for every class c
  * ours, 1 worker:  segreward.stats.class_frequencies(..., workers=1)
  * ours, 2 workers: segreward.stats.class_frequencies(..., workers=2) (pool start-up included)

and the ratios the issue asks for: counting overhead over decoding (goal <= 25%), speed-up
over the naive loop (goal >= 5x), and 2 vs 1 workers (goal >= 1.7x). Also the time spent
counting alone (time minus decode time) of ours vs naive. Writes benchmarks/results/stats.json.
The machine may be shared: the best of --repeat runs is reported, and the load average is
recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segreward.data.io import read_label
from segreward.stats import class_frequencies, find_label_files

ROOT = Path(__file__).resolve().parent
DEFAULT_FOLDERS = [ROOT.parent.parent / "shared" / "data" / "camvid" / "trainannot",
                   ROOT.parent.parent / "shared" / "data" / "camvid" / "valannot"]
CAMVID_CLASSES = 11  # ids 0..10; 11 (void) is mapped to the ignore index via the camvid dataset


def generate(folder: Path, n: int = 300, h: int = 360, w: int = 480, classes: int = 12) -> list[Path]:
    """Piecewise-constant label maps (random rectangles), like real annotations."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = np.full((h, w), rng.integers(classes), np.uint8)
        for _ in range(40):
            y, x = rng.integers(0, h), rng.integers(0, w)
            a[y : y + rng.integers(5, h // 2), x : x + rng.integers(5, w // 2)] = rng.integers(classes)
        path = folder / f"{i:04d}.png"
        Image.fromarray(a, "L").save(path)
        paths.append(path)
    return paths


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode(files):
    for f in files:
        read_label(f)


def naive(files, num_classes):
    counts = np.zeros(num_classes, np.int64)
    for f in files:
        label = read_label(f)
        for c in range(num_classes):
            counts[c] += (label == c).sum()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", nargs="+", type=Path, default=DEFAULT_FOLDERS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "stats.json")
    args = parser.parse_args()

    tmp = None
    if all(d.is_dir() for d in args.folders):
        files = [f for d in args.folders for f in find_label_files(d, ".png")]
        source, dataset, num_classes = ", ".join(map(str, args.folders)), "camvid", CAMVID_CLASSES
    else:
        tmp = tempfile.TemporaryDirectory()
        files = generate(Path(tmp.name))
        source, dataset, num_classes = f"{len(files)} generated 480x360 maps", None, 12
    n = len(files)
    with Image.open(files[0]) as img:
        size, mode = img.size, img.mode
    print(f"{n} label maps ({size[0]}x{size[1]}, mode {mode}) from {source}")

    decode(files)  # warm the file cache
    kw = {"dataset": dataset} if dataset else {"num_classes": num_classes}
    ours1 = class_frequencies(files, workers=1, progress=False, **kw)
    ref = naive(files, num_classes)
    assert ours1.counts.tolist() == ref.tolist(), (ours1.counts, ref)  # same answer before timing

    t_decode = best_of(lambda: decode(files), args.repeat)
    t_ours1 = best_of(lambda: class_frequencies(files, workers=1, progress=False, **kw), args.repeat)
    t_naive = best_of(lambda: naive(files, num_classes), args.repeat)
    t_ours2 = best_of(lambda: class_frequencies(files, workers=2, progress=False, **kw), args.repeat)

    rows = {"decode": t_decode, "naive (label == c).sum()": t_naive, "ours, 1 worker": t_ours1,
            "ours, 2 workers": t_ours2}
    print(f"\n{'':<28}{'images/s':>10}{'ms/image':>10}")
    for name, t in rows.items():
        print(f"{name:<28}{n / t:>10.1f}{1000 * t / n:>10.3f}")
    ratios = {
        "counting_overhead_vs_decode": t_ours1 / t_decode - 1,
        "speedup_vs_naive": t_naive / t_ours1,
        "counting_only_speedup_vs_naive": (t_naive - t_decode) / max(t_ours1 - t_decode, 1e-9),
        "workers_2_vs_1": t_ours1 / t_ours2,
    }
    goals = {"counting_overhead_vs_decode": ("<=", 0.25), "speedup_vs_naive": (">=", 5.0),
             "workers_2_vs_1": (">=", 1.7)}
    print()
    for key, value in ratios.items():
        goal = goals.get(key)
        ok = "" if goal is None else (f"  goal {goal[0]} {goal[1]}: "
                                      + ("met" if (value <= goal[1] if goal[0] == "<=" else value >= goal[1])
                                         else "NOT met"))
        shown = f"{100 * value:.1f}%" if key == "counting_overhead_vs_decode" else f"{value:.2f}x"
        print(f"{key:<32}{shown:>10}{ok}")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores "
          "(the machine may be shared; figures are the best of the repeats)")

    result = {
        "source": source, "num_images": n, "image_size": list(size), "mode": mode, "num_classes": num_classes,
        "repeat": args.repeat, "seconds": rows, "images_per_s": {k: n / t for k, t in rows.items()},
        "ratios": ratios, "goals": {k: f"{op} {v}" for k, (op, v) in goals.items()},
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "loadavg": load, "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
