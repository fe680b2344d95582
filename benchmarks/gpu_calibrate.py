"""Calibration on a GPU at the Cityscapes-val shape: exact fit and streaming pass vs one evaluation.

    PYTHONPATH=src python benchmarks/gpu_calibrate.py                        # CUDA: 19 classes, 1024x2048
    PYTHONPATH=src python benchmarks/gpu_calibrate.py --device cpu --images 2 --size 64 128   # dry run

Run by ``benchmarks/gpu_check.sh``. Logits of ``--images`` frames at ``--size`` with ``--classes``
classes, made on the device (a label map of random rectangles; logits = 2 x one-hot + noise, with
per-class shifts, so calibration has something to undo; 5% ignored pixels). Every path runs on
the device's tensors:

1. **exact**: :func:`segreward.calibrate.fit_offsets` (``kfold=None``) vs one evaluation of the
   same logits (``argmax(z + b)`` + confusion matrix): seconds and the ratio (the CPU goal is
   <= 30 evaluations);
2. **streaming**: one :class:`~segreward.calibrate.stream.ThresholdHistogram` pass over the frames in
   batches of ``--batch`` vs an evaluation pass over the same batches (the CPU goal, with a model,
   is <= 1.15x), and a 2-pass streaming fit with a 2-fold estimate, to check they run.

Writes ``gpu_calibrate.json`` to ``--out-dir`` (default ``$OUT`` if set, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from segreward.calibrate import fit_offsets
from segreward.calibrate.passes import fit_passes
from segreward.calibrate.stream import ThresholdHistogram
from segreward.metrics import confusion_matrix

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _common import machine_info, write_result  # noqa: E402  (benchmarks/ is not a package)


def make_set(n, c, h, w, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.randint(0, c, (n, 1, 1), generator=g).expand(n, h, w).clone()
    for i in range(n):
        for _ in range(24):
            y, x = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
            dy, dx = int(torch.randint(4, h // 3, (1,), generator=g)), int(torch.randint(4, w // 3, (1,), generator=g))
            labels[i, y:y + dy, x:x + dx] = int(torch.randint(0, c, (1,), generator=g))
    labels = labels.to(device)
    labels[torch.rand(n, h, w, generator=g).to(device) < 0.05] = 255
    logits = 2.0 * torch.nn.functional.one_hot(labels.clamp(max=c - 1), c).permute(0, 3, 1, 2).float()
    logits += 1.5 * torch.randn(n, c, h, w, generator=g).to(device)
    logits += torch.linspace(-1.0, 1.0, c, device=device).view(1, c, 1, 1)  # miscalibration to undo
    return logits, labels


def timed(fn, device, reps=1):
    times, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=8, help="frames of the exact fit (Cityscapes val: 500)")
    p.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--batch", type=int, default=2, help="streaming batch")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=os.environ.get("OUT", str(ROOT / "results")))
    args = p.parse_args(argv)
    device, c = torch.device(args.device), args.classes
    logits, labels = make_set(args.images, c, *args.size, device)
    zero = torch.zeros(c, device=device)

    def evaluate():
        return confusion_matrix((logits + zero.view(1, c, 1, 1)).argmax(1), labels, c, 255, validate=False).sum(0)

    timed(evaluate, device)  # warm-up
    _, eval_s = timed(evaluate, device, args.reps)
    fit_offsets(logits[:1], labels[:1], kfold=None, max_sweeps=1)  # warm-up
    cal, fit_s = timed(lambda: fit_offsets(logits, labels, kfold=None), device)

    def batches():
        return ((logits[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, args.images, args.batch))

    def stream_pass():
        h = ThresholdHistogram(torch.zeros(c, dtype=torch.float64), 1024, 8.0)
        for z, y in batches():
            h.update(z, y)
        return h

    def eval_pass():
        cm = torch.zeros(c, c, dtype=torch.long, device=device)
        for z, y in batches():
            cm += confusion_matrix(z.argmax(1), y, c, 255, validate=False).sum(0)
        return cm.cpu()

    stream_pass(), eval_pass()
    _, pass_s = timed(stream_pass, device, args.reps)
    _, eval_pass_s = timed(eval_pass, device, args.reps)
    small = lambda: ((logits[i:i + 1], labels[i:i + 1]) for i in range(min(4, args.images)))  # noqa: E731
    (scal, _), smoke_s = timed(lambda: fit_passes(small, c, mode="streaming", kfold=2, max_sweeps=2), device)
    result = {
        "command": "python benchmarks/gpu_calibrate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args), "machine": {**machine_info(), "device": str(device)},
        "pixels": int((labels != 255).sum()),
        "exact": {"seconds": fit_s, "evaluation_seconds": eval_s, "evaluations": fit_s / eval_s,
                  "reward_before": cal.reward_before, "reward_after": cal.reward_after, "sweeps": cal.sweeps},
        "streaming": {"pass_seconds": pass_s, "eval_pass_seconds": eval_pass_s, "ratio": pass_s / eval_pass_s,
                      "smoke_fit_seconds": smoke_s, "smoke_reward": scal.reward_after, "smoke_cv": scal.cv},
    }
    print(f"{args.images} x {args.size[0]}x{args.size[1]}, {c} classes on {device}: exact fit {fit_s:.2f} s = "
          f"{fit_s / eval_s:.1f} evaluations ({1e3 * eval_s:.1f} ms each), reward {100 * cal.reward_before:.2f} -> "
          f"{100 * cal.reward_after:.2f} in {cal.sweeps} sweeps; streaming pass {pass_s:.3f} s vs eval pass "
          f"{eval_pass_s:.3f} s ({pass_s / eval_pass_s:.2f}x); streaming + 2-fold smoke run {smoke_s:.1f} s")
    print(f"wrote {write_result(Path(args.out_dir) / 'gpu_calibrate.json', result)}")
    return result


if __name__ == "__main__":
    main()
