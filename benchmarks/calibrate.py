"""Speed and memory of calibration: exact fit vs a grid search, streaming vs exact, a large streaming run.

    PYTHONPATH=src python benchmarks/calibrate.py                                 # synthetic, ~6 min on 1 core
    PYTHONPATH=src python benchmarks/calibrate.py --camvid ../shared/data/camvid  # CamVid dusk tuning frames
    PYTHONPATH=src python benchmarks/calibrate.py --logits saved.pt               # logits saved by --save-logits
    PYTHONPATH=src python benchmarks/calibrate.py --device cuda --stream-images 500 --stream-size 1024 2048

The calibration set (parts 1 and 2): the logits of 41 frames of 96x128 with 11 classes from a
small U-Net (``--width``) trained ``--train-steps`` steps with cross-entropy on the source domain
and run on the target domain, so its logits carry the miscalibration of a domain shift:

* default: the built-in synthetic street scenes (:mod:`segreward.data.synthetic`), trained on the
  ``day`` style, calibrated on ``dusk`` frames. The generator has 8 classes; more classes come from
  splitting road, building, vegetation, ... by depth (``road`` near, ``road_far1`` beyond a
  distance), confusable classes of very different sizes, like CamVid's or Cityscapes';
* ``--camvid ROOT``: trained on the day sequences 0006R0 + 0016E5 of ``train/``, calibrated on the
  tuning frames of the dusk sequence 0001TP (the first 2/3 by frame number: 41 frames), as in
  ``benchmarks/camvid_da.py``;
* ``--logits FILE.pt``: ``{"logits": [N, C, H, W], "labels": [N, H, W]}`` (``--save-logits`` writes
  one); the "model" is then the identity on the stored logits.

1. **Exact fit vs grid search** on the calibration set's logits (computed once): the time of
   :func:`segreward.calibrate.fit_offsets` (from the logits tensors: flattening included, k-fold
   off; median of ``--reps``) vs a coordinate-ascent grid search (``--grid-points`` offsets per
   class per sweep in ``b_c +- --grid-radius`` logits, each scored by the dataset reward of
   ``argmax(z + b)`` over all pixels: argmax + bincount), run until it reaches the exact fit's
   reward, stalls, or ``--grid-max-sweeps``; one run. The exact fit is also given as a number of
   evaluations (one ``set_reward``: argmax + counts over the same pixels; the median over the
   repetitions of each fit's time over the evaluations timed right after it, same process).
   Goals: exact <= 1 s (<= 30 evaluations), >= 20x faster than the grid at equal or better reward.
2. **Streaming vs exact** on the same set, each through
   :func:`segreward.engine.calibration.calibrate_model` (model passes included): reward gap,
   time, passes, peak memory. One streaming pass (model + threshold histograms) vs a plain
   evaluation pass (model + argmax + confusion matrix), interleaved ``--reps`` rounds, median
   (goal <= 1.15x); the same two without the model, on the collected logits. Peak memory of
   streaming (and exact) at ``--flat-images`` images (goal: flat in the number of images).
3. **A large streaming run**, Cityscapes-val-like as far as the machine allows: ``--stream-images``
   synthetic dusk scenes with labels at ``--stream-size`` and ``--classes`` classes; the model
   (trained like the small one, for this number of classes) sees the images at
   ``1/--stream-scale`` of the label size and its logits are upsampled to it, as a stride-4
   decoder's are. Time per pass vs an evaluation pass, peak memory, and the reward gap to the
   exact fit when it fits in ``--exact-limit-gb`` (the pixels' float64 logits).

Peak memory: on CPU, the peak of the tensor memory allocated while the measured call runs (above
what was allocated before it), from the torch profiler's allocation events (Python objects and
numpy arrays are not counted; tensors that existed before, like the dataset, are not either);
on CUDA also ``torch.cuda.max_memory_allocated`` above the memory held before. Measured in
separate runs from the timings (the profiler slows things down).

Writes ``benchmarks/results/calibrate.json`` (``--out``): settings, machine, torch version,
threads, load average before/after, every number. Timings on a loaded machine are not valid:
run it on an idle one.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segreward.calibrate import fit_offsets, pixel_set
from segreward.calibrate.exact import set_reward
from segreward.calibrate.search import check_count_form
from segreward.calibrate.stream import ThresholdHistogram
from segreward.data import synthetic
from segreward.data.transforms import to_tensor
from segreward.engine.builders import resize_logits
from segreward.engine.calibration import calibrate_model, model_batches
from segreward.metrics import confusion_matrix
from segreward.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _common import machine_info, write_result  # noqa: E402  (benchmarks/ is not a package)
IGNORE = 255
DAY, DUSK = ("0006R0", "0016E5"), "0001TP"
PARTS = ("grid", "streaming", "large")  # 1. exact vs grid, 2. streaming vs exact, 3. large streaming run


# ----------------------------------------------------------------------------- data
# Classes of the synthetic scenes beyond the generator's 8: a class is split by depth into bins
# (bin 0 keeps the class's id, the far bins get new ids), in this order, round robin.
SPLITTABLE = (synthetic.ROAD, synthetic.BUILDING, synthetic.VEGETATION, synthetic.PAVEMENT, synthetic.CAR,
              synthetic.PERSON, synthetic.POLE)
MEDIAN_DEPTH = {synthetic.ROAD: 6.0, synthetic.BUILDING: 26.0, synthetic.VEGETATION: 18.0, synthetic.PAVEMENT: 14.0,
                synthetic.CAR: 25.0, synthetic.PERSON: 15.0, synthetic.POLE: 55.0}  # metres, measured


def depth_classes(num_classes: int) -> tuple[list[str], dict[int, list[tuple[float, int]]]]:
    """Class names and, per split class, ``[(depth threshold, class id of the pixels beyond)]``."""
    base = synthetic.NUM_CLASSES
    if num_classes < base:
        raise SystemExit(f"--classes {num_classes}: the synthetic scenes have at least {base} classes")
    bins = {k: 1 for k in SPLITTABLE}
    for j in range(num_classes - base):
        bins[SPLITTABLE[j % len(SPLITTABLE)]] += 1
    names, splits, next_id = list(synthetic.CLASSES), {}, base
    for k in SPLITTABLE:
        n = bins[k]
        # Thresholds a factor 2 apart, centred on the class's median depth.
        splits[k] = [(MEDIAN_DEPTH[k] * 2.0 ** (j + 1 - n / 2), next_id + j) for j in range(n - 1)]
        names += [f"{synthetic.CLASSES[k]}_far{j + 1}" for j in range(n - 1)]
        next_id += n - 1
    return names, splits


class Scenes(Dataset):
    """Synthetic street scenes with ``classes`` classes: images at ``size / scale``, labels at
    ``size`` (nearest upsampling of the rendered label by ``scale``). Rendered once, held as uint8."""

    def __init__(self, n: int, style: str, classes: int, size, scale: int = 1, split: str = "val", seed: int = 0,
                 progress: bool = True):
        h, w = size[0] // scale, size[1] // scale
        names, splits = depth_classes(classes)
        images, labels = np.empty((n, h, w, 3), np.uint8), np.empty((n, h, w), np.uint8)
        for i in tqdm(range(n), desc=f"render {style} {h}x{w}", disable=not progress, leave=False):
            images[i], label, depth = synthetic.render(i, style, seed, (h, w), split)
            for k, cuts in splits.items():
                mine = label == k
                for threshold, cls in cuts:  # ascending: each farther bin overwrites the nearer one
                    label[mine & (depth > threshold)] = cls
            labels[i] = label
        self.images, self.labels, self.scale = images, labels, scale
        self.meta = SimpleNamespace(classes=names, ignore_index=IGNORE, num_classes=classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x, y = to_tensor(self.images[i], self.labels[i])
        if self.scale > 1:
            y = y.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
        return x, y


class StoredLogits(Dataset):
    """Items ``(logits [C, H, W], labels [H, W])`` of a saved set, cycled to ``n`` items."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, n: int | None = None):
        self.logits, self.labels, self.n = logits.float(), labels.long(), n or len(logits)
        c = logits.shape[1]
        self.meta = SimpleNamespace(classes=[str(k) for k in range(c)], ignore_index=IGNORE, num_classes=c)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.logits[i % len(self.logits)], self.labels[i % len(self.labels)]


def camvid_sets(root: str, size) -> dict:
    """CamVid at ``size``: day training frames, the dusk tuning frames, and all frames (for ``more``)."""
    from segreward.data.formats import CamVidDataset
    from segreward.data.memory import InMemoryDataset
    kw = dict(size=tuple(size), cache=False)
    train = InMemoryDataset.decode(CamVidDataset(root, "train", sequences=list(DAY), **kw), progress=True)
    tune = InMemoryDataset.decode(CamVidDataset(root, "train", sequences=DUSK, frames=(0, 2 / 3), **kw))
    every = InMemoryDataset.decode(CamVidDataset(root, "train+val", **kw), progress=True)
    return {"train": train, "tune": tune, "every": every}


# ----------------------------------------------------------------------------- model
def train_model(train_set: Dataset, classes: int, args, desc: str) -> nn.Module:
    """A U-Net trained ``--train-steps`` steps of cross-entropy (Adam, batch ``--batch``), in eval mode."""
    torch.manual_seed(args.seed)
    model = build_model("unet", classes, width=args.width).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=len(train_set) > args.batch,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = iter(())
    for _ in tqdm(range(args.train_steps), desc=desc, leave=False):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(args.device), y.to(args.device)
        loss = F.cross_entropy(resize_logits(model(x), y.shape[-2:]), y, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def source_of(args) -> SimpleNamespace:
    """The calibration set's model and data: ``model``, ``tune`` (the calibration set),
    ``more(n)`` (``n`` frames of the same kind, for the memory-vs-images runs), ``what``."""
    h, w = args.size
    if args.logits:
        saved = torch.load(args.logits, map_location="cpu", weights_only=True)
        logits, labels = (saved["logits"], saved["labels"]) if isinstance(saved, dict) else saved
        return SimpleNamespace(model=nn.Identity(), tune=StoredLogits(logits, labels), num_classes=logits.shape[1],
                               more=lambda n: StoredLogits(logits, labels, n), params=0,
                               what=f"logits of {len(logits)} images loaded from {args.logits}")
    if args.camvid:
        sets = camvid_sets(args.camvid, args.size)
        model = train_model(sets["train"], 11, args, "train unet (CamVid day)")
        return SimpleNamespace(model=model, tune=sets["tune"], num_classes=11, params=count_parameters(model),
                               more=lambda n: sets["every"].subset(slice(0, n)),
                               what=f"CamVid {DUSK} tuning frames (first 2/3 of train/), U-Net trained "
                                    f"{args.train_steps} steps on {'+'.join(DAY)}")
    c = args.set_classes
    train = Scenes(args.train_images, "day", c, (h, w), split="train", seed=args.seed)
    model = train_model(train, c, args, "train unet (synthetic day)")
    return SimpleNamespace(model=model, tune=Scenes(args.frames, "dusk", c, (h, w), seed=args.seed), num_classes=c,
                           more=lambda n: Scenes(n, "dusk", c, (h, w), seed=args.seed + 1),
                           params=count_parameters(model),
                           what=f"synthetic dusk scenes, U-Net trained {args.train_steps} steps on "
                                f"{args.train_images} day scenes")


@torch.no_grad()
def collect(model: nn.Module, dataset: Dataset, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (at the label size, float32, CPU) and labels of a whole set."""
    zs, ys = [], []
    for logits, labels in model_batches(model, dataset, args.batch, args.device)():
        zs.append(logits.cpu())
        ys.append(labels.cpu())
    return torch.cat(zs), torch.cat(ys)


# ----------------------------------------------------------------------------- measuring
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """``(result, seconds)`` of one call."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_memory(fn, device="cpu") -> dict:
    """Peak tensor memory (MB) allocated while ``fn()`` runs, above what was allocated before.

    CPU: a running sum of the profiler's allocation events (``[memory]``, bytes + on allocation,
    - on free) in time order; tensors allocated before the call do not count, even when the call
    reads them. CUDA: ``max_memory_allocated`` above the memory held before.
    """
    from torch.profiler import ProfilerActivity, profile
    out = {}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        out["cuda_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    out["cpu_mb"] = peak / 2**20
    return out


def interleaved(fns: dict, reps: int, device="cpu", warmup: int = 1) -> dict:
    """Median seconds of each function over ``reps`` rounds that run them in a shuffled order."""
    times = {n: [] for n in fns}
    order, rng = list(fns), random.Random(0)
    for rep in range(warmup + reps):
        rng.shuffle(order)
        for n in order:
            _, t = timed(fns[n], device)
            if rep >= warmup:
                times[n].append(t)
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for n, t in times.items()}


# ----------------------------------------------------------------------------- 1. exact vs grid
def grid_search(pixels, form, target: float, points: int, radius: float, max_sweeps: int) -> dict:
    """Coordinate ascent over a grid of offsets: for each class in turn, ``points`` values of
    ``b_c`` in ``b_c +- radius``, each scored by the dataset reward of ``argmax(z + b)`` (argmax +
    bincount over every pixel), the best kept (the current offset on ties). Stops when the reward
    reaches ``target``, a sweep changes nothing, or after ``max_sweeps``."""
    c = pixels.num_classes
    b = torch.zeros(c, dtype=torch.float64)
    grid = torch.linspace(-radius, radius, points, dtype=torch.float64)  # holds 0 when points is odd
    t0 = time.perf_counter()
    best = set_reward(form, pixels, b)
    trace, evaluations, sweeps, stalled = [(0.0, best)], 1, 0, False
    bar = tqdm(total=max_sweeps * c, desc="grid search", leave=False)
    while best < target and sweeps < max_sweeps:
        changed = False
        for k in range(c):
            trial = b.clone()
            scores = []
            for step in grid:
                trial[k] = b[k] + step
                scores.append(set_reward(form, pixels, trial))
            evaluations += points
            j = max(range(points), key=lambda i: (scores[i], -abs(float(grid[i]))))
            if scores[j] > best:
                b[k] += grid[j]
                best, changed = scores[j], True
            trace.append((time.perf_counter() - t0, best))
            bar.update(1)
            bar.set_postfix(reward=f"{best:.4f}", refresh=False)
            if best >= target:
                break
        sweeps += 1
        if not changed:
            stalled = True
            break
    bar.close()
    seconds = time.perf_counter() - t0
    return {"reward": best, "reached_exact": best >= target, "seconds": seconds, "sweeps": sweeps,
            "stalled": stalled, "evaluations": evaluations, "seconds_per_evaluation": seconds / evaluations,
            "offsets": [float(v) for v in b - b.mean()], "trace": [[round(t, 4), r] for t, r in trace]}


def first_time_within(trace, target: float, gap: float):
    """Seconds until the trace's reward is within ``gap`` of ``target`` (None if never)."""
    return next((t for t, r in trace if r >= target - gap), None)


def part_exact_vs_grid(logits, labels, args) -> dict:
    form = check_count_form(args.reward, logits.shape[1])
    fit = lambda: fit_offsets(logits, labels, reward=args.reward, kfold=None)  # noqa: E731
    pixels, flatten_s = timed(lambda: pixel_set(logits, labels))
    # One evaluation of the same pixels (argmax(z + b) + counts + reward), what a grid point costs:
    # the exact fit as a number of evaluations. Fits and evaluations alternate, and each fit is
    # divided by the median of the three evaluations right after it: on a VM whose speed drifts
    # by tens of percent within minutes, a ratio of two medians taken minutes apart drifts too.
    zero = torch.zeros(logits.shape[1], dtype=torch.float64)
    evaluate = lambda: set_reward(form, pixels, zero)  # noqa: E731
    times, evals, ratios = [], [], []
    for rep in tqdm(range(1 + args.reps), desc="exact fit", leave=False):  # the first is a warm-up
        cal, t = timed(fit)
        e = statistics.median(timed(evaluate)[1] for _ in range(3))
        if rep:
            times.append(t)
            evals.append(e)
            ratios.append(t / e)
    exact_s, eval_s = statistics.median(times), statistics.median(evals)
    grid = grid_search(pixels, form, cal.reward_after, args.grid_points, args.grid_radius, args.grid_max_sweeps)
    exact = {"reward_before": cal.reward_before, "reward": cal.reward_after, "seconds": exact_s,
             "evaluation_seconds": eval_s, "evaluations": statistics.median(ratios),
             "evaluations_all": ratios, "evaluation_seconds_all": evals, "seconds_all": times,
             "flatten_seconds": flatten_s, "sweeps": cal.sweeps,
             "converged": cal.converged, "history": cal.history, "offsets": [float(v) for v in cal.offsets]}
    ratio = grid["seconds"] / exact_s
    within = {f"{gap:g}": first_time_within(grid["trace"], cal.reward_after, gap) for gap in (1e-3, 1e-2)}
    return {"pixels": int(pixels.t.numel()), "images": int(logits.shape[0]), "classes": int(logits.shape[1]),
            "exact": exact, "grid": {**grid, "seconds_to_within": within},
            "grid_over_exact_time": ratio,
            "goals": {"exact_at_most_1s": exact_s <= 1.0, "exact_at_most_30_evaluations": exact["evaluations"] <= 30,
                      "grid_20x_slower_at_equal_reward": grid["reached_exact"] and ratio >= 20,
                      "grid_never_reached_exact_reward": not grid["reached_exact"]}}


# ----------------------------------------------------------------------------- 2. streaming vs exact
def streaming_pass(model, dataset, c: int, args):
    """One streaming pass at zero offsets: model + threshold histograms of every batch."""
    h = ThresholdHistogram(torch.zeros(c, dtype=torch.float64), args.bins, args.span, IGNORE)
    for logits, labels in model_batches(model, dataset, args.batch, args.device)():
        h.update(logits, labels)
    return h


def eval_pass(model, dataset, c: int, args) -> torch.Tensor:
    """A plain evaluation pass: model + argmax + confusion matrix."""
    cm = torch.zeros(c, c, dtype=torch.long, device=args.device)
    for logits, labels in model_batches(model, dataset, args.batch, args.device)():
        cm += confusion_matrix(logits.argmax(1), labels, c, IGNORE, validate=False).sum(0)
    return cm


def pass_costs(model, dataset, c: int, args) -> dict:
    """One streaming pass vs one evaluation pass (with the model, and on collected logits)."""
    with_model = interleaved({"streaming_pass": lambda: streaming_pass(model, dataset, c, args),
                              "eval_pass": lambda: eval_pass(model, dataset, c, args)}, args.reps, args.device)
    batches = list(model_batches(model, dataset, args.batch, args.device)())  # the logits, held

    def hist_only():
        h = ThresholdHistogram(torch.zeros(c, dtype=torch.float64), args.bins, args.span, IGNORE)
        for z, y in batches:
            h.update(z, y)

    def argmax_only():
        for z, y in batches:
            confusion_matrix(z.argmax(1), y, c, IGNORE, validate=False).sum(0)

    logits_only = interleaved({"histograms": hist_only, "argmax_confusion": argmax_only}, args.reps, args.device)
    ratio = with_model["streaming_pass"]["median_s"] / with_model["eval_pass"]["median_s"]
    return {"with_model": with_model, "logits_only": logits_only, "streaming_over_eval": ratio,
            "histograms_over_argmax_confusion": logits_only["histograms"]["median_s"]
            / logits_only["argmax_confusion"]["median_s"],
            "goal_at_most_1.15x": ratio <= 1.15}


def calibrate(model, dataset, mode: str, args, max_sweeps: int | None = None, progress: bool = False):
    return calibrate_model(model, dataset, reward=args.reward, mode=mode, kfold=None, bins=args.bins, span=args.span,
                           max_sweeps=max_sweeps or args.max_sweeps, batch_size=args.batch, device=args.device,
                           progress=progress)


def part_streaming(src, args) -> dict:
    model, tune, c = src.model, src.tune, src.num_classes
    exact, exact_s = timed(lambda: calibrate(model, tune, "exact", args), args.device)
    stream, stream_s = timed(lambda: calibrate(model, tune, "streaming", args), args.device)
    memory = {"exact": peak_memory(lambda: calibrate(model, tune, "exact", args), args.device),
              "streaming": peak_memory(lambda: calibrate(model, tune, "streaming", args), args.device)}
    costs = pass_costs(model, tune, c, args)
    flat = {}
    for n in tqdm(args.flat_images, desc="memory vs images", leave=False):
        data = src.more(n)
        flat[str(n)] = {
            # Two passes hold everything a longer run does (the second one's offsets come from the first).
            "streaming": peak_memory(lambda: calibrate(model, data, "streaming", args, max_sweeps=2), args.device),
            "exact": peak_memory(lambda: calibrate(model, data, "exact", args, max_sweeps=2), args.device)}
    # Flat in the number of images: compared over the counts of two batches or more (one batch
    # holds no second batch's logits while the first is binned: a constant, not growth).
    multi = [v["streaming"]["cpu_mb"] for n, v in flat.items() if int(n) >= 2 * args.batch] or \
        [v["streaming"]["cpu_mb"] for v in flat.values()]
    growth = max(multi) / max(min(multi), 1e-9)
    return {"exact": {"reward": exact.reward_after, "seconds": exact_s, "sweeps": exact.sweeps,
                      "converged": exact.converged, "history": exact.history},
            "streaming": {"reward": stream.reward_after, "seconds": stream_s, "passes": stream.sweeps,
                          "converged": stream.converged, "history": stream.history},
            "reward_gap": exact.reward_after - stream.reward_after,
            "streaming_over_exact_time": stream_s / exact_s, "memory": memory, "pass_cost": costs,
            "memory_vs_images": flat, "streaming_peak_max_over_min": growth,
            "goals": {"pass_at_most_1.15x_eval": costs["goal_at_most_1.15x"],
                      "streaming_memory_flat (max/min <= 1.1 over >= 2 batches)": growth <= 1.1}}


# ----------------------------------------------------------------------------- 3. large streaming run
def part_large(args) -> dict:
    (h, w), s, c = args.stream_size, args.stream_scale, args.classes
    ih, iw = h // s, w // s
    # Train at the model's input size, at most 128x256 pixels (a larger run keeps the same model).
    shrink = max(1.0, math.sqrt(ih * iw / (128 * 256)))
    train = Scenes(args.train_images, "day", c, (int(ih / shrink), int(iw / shrink)), split="train", seed=args.seed)
    model = train_model(train, c, args, f"train unet ({c} classes)")
    data = Scenes(args.stream_images, "dusk", c, (h, w), scale=s, seed=args.seed)
    label_h, label_w = ih * s, iw * s
    m = args.stream_images * label_h * label_w
    stream, stream_s = timed(lambda: calibrate(model, data, "streaming", args, progress=True), args.device)
    costs = interleaved({"streaming_pass": lambda: streaming_pass(model, data, c, args),
                         "eval_pass": lambda: eval_pass(model, data, c, args)}, max(1, args.stream_reps), args.device,
                        warmup=0)
    memory = peak_memory(lambda: calibrate(model, data, "streaming", args, max_sweeps=2), args.device)
    exact_gb = m * c * 8 / 2**30
    out = {"images": args.stream_images, "label_size": [label_h, label_w], "input_size": [ih, iw], "classes": c,
           "pixels": m, "train_size": list(train.images.shape[1:3]),
           "streaming": {"reward_before": stream.reward_before, "reward": stream.reward_after, "seconds": stream_s,
                         "passes": stream.sweeps, "converged": stream.converged, "history": stream.history},
           "pass_cost": costs,
           "streaming_over_eval": costs["streaming_pass"]["median_s"] / costs["eval_pass"]["median_s"],
           "seconds_per_image_per_pass": costs["streaming_pass"]["median_s"] / args.stream_images,
           "memory_two_passes": memory, "exact_float64_logits_gb": exact_gb}
    if exact_gb <= args.exact_limit_gb:
        exact, exact_s = timed(lambda: calibrate(model, data, "exact", args, progress=True), args.device)
        out["exact"] = {"reward": exact.reward_after, "seconds": exact_s, "sweeps": exact.sweeps,
                        "converged": exact.converged, "history": exact.history}
        out["reward_gap"] = exact.reward_after - stream.reward_after
    else:
        out["exact"] = {"skipped": f"needs {exact_gb:.1f} GB of float64 logits > --exact-limit-gb "
                                   f"{args.exact_limit_gb}"}
    return out


# ----------------------------------------------------------------------------- report
def report_grid(res: dict) -> None:
    p1 = res["exact_vs_grid"]
    print(f"\n== 1. Exact fit vs grid search: {p1['images']} images, {p1['pixels']} labelled pixels, "
          f"{p1['classes']} classes; reward {res['settings']['reward']}")
    e, g = p1["exact"], p1["grid"]
    print(f"{'':<34}{'reward':>9}{'seconds':>10}{'sweeps':>8}")
    print(f"{'uncalibrated':<34}{100 * e['reward_before']:>9.2f}")
    print(f"{'exact fit (fit_offsets)':<34}{100 * e['reward']:>9.2f}{e['seconds']:>10.3f}{e['sweeps']:>8}"
          f"   = {e['evaluations']:.1f} evaluations of {1000 * e['evaluation_seconds']:.1f} ms")
    if e.get("evaluations_all"):
        r = sorted(e["evaluations_all"])
        print(f"{'':<34}(median of {len(r)} fit / evaluation ratios, each fit over the evaluations right after it; "
              f"range {r[0]:.1f}-{r[-1]:.1f})")
    label = f"grid {res['settings']['grid_points']} pts/class/sweep"
    print(f"{label:<34}{100 * g['reward']:>9.2f}{g['seconds']:>10.3f}{g['sweeps']:>8}"
          f"   {'reached the exact reward' if g['reached_exact'] else 'never reached the exact reward'}")
    w = {k: "never" if v is None else f"{v:.2f} s" for k, v in g["seconds_to_within"].items()}
    print(f"  grid time / exact time: {p1['grid_over_exact_time']:.1f}x"
          f"{'' if g['reached_exact'] else ' (the grid stopped below the exact reward)'}; "
          f"grid within 0.1 / 1 point of it: {w['0.001']} / {w['0.01']}; "
          f"{1000 * g['seconds_per_evaluation']:.1f} ms per grid evaluation")
    print(f"  goals: {p1['goals']}")


def report_streaming(res: dict) -> None:
    p2 = res["streaming_vs_exact"]
    print("\n== 2. Streaming vs exact on the same set (calibrate_model, model passes included)")
    mem = p2["memory"]
    print(f"{'':<12}{'reward':>9}{'seconds':>10}{'passes':>8}{'peak MB':>10}")
    print(f"{'exact':<12}{100 * p2['exact']['reward']:>9.2f}{p2['exact']['seconds']:>10.3f}{1:>8}"
          f"{mem['exact']['cpu_mb']:>10.1f}")
    print(f"{'streaming':<12}{100 * p2['streaming']['reward']:>9.2f}{p2['streaming']['seconds']:>10.3f}"
          f"{p2['streaming']['passes']:>8}{mem['streaming']['cpu_mb']:>10.1f}")
    pc = p2["pass_cost"]
    print(f"  reward gap exact - streaming: {100 * p2['reward_gap']:+.3f} points")
    print(f"  one streaming pass {1000 * pc['with_model']['streaming_pass']['median_s']:.1f} ms vs eval pass "
          f"{1000 * pc['with_model']['eval_pass']['median_s']:.1f} ms: {pc['streaming_over_eval']:.2f}x; "
          f"without the model: histograms {1000 * pc['logits_only']['histograms']['median_s']:.1f} ms vs argmax + "
          f"confusion {1000 * pc['logits_only']['argmax_confusion']['median_s']:.1f} ms")
    print("  peak MB by images: " + ", ".join(f"{n}: streaming {v['streaming']['cpu_mb']:.1f} / exact "
                                            f"{v['exact']['cpu_mb']:.1f}" for n, v in p2["memory_vs_images"].items()))
    print(f"  goals: {p2['goals']}")


def report_large(res: dict) -> None:
    p3 = res["large_streaming"]
    print(f"\n== 3. Large streaming run: {p3['images']} images, labels {p3['label_size'][0]}x{p3['label_size'][1]}, "
          f"model input {p3['input_size'][0]}x{p3['input_size'][1]}, {p3['classes']} classes")
    st = p3["streaming"]
    print(f"  streaming: {100 * st['reward_before']:.2f} -> {100 * st['reward']:.2f} in {st['passes']} passes "
          f"({'converged' if st['converged'] else 'not converged'}), {st['seconds']:.1f} s; pass "
          f"{p3['pass_cost']['streaming_pass']['median_s']:.2f} s vs eval pass "
          f"{p3['pass_cost']['eval_pass']['median_s']:.2f} s ({p3['streaming_over_eval']:.2f}x); "
          f"peak {p3['memory_two_passes']['cpu_mb']:.0f} MB")
    if "reward" in p3["exact"]:
        print(f"  exact: {100 * p3['exact']['reward']:.2f} in {p3['exact']['seconds']:.1f} s "
              f"({p3['exact']['sweeps']} sweeps); gap exact - streaming {100 * p3['reward_gap']:+.3f} points")
    else:
        print(f"  exact: {p3['exact']['skipped']}")


# ----------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("calibration set (parts 1 and 2)")
    src.add_argument("--camvid", default=None, metavar="ROOT", help="use CamVid (dusk 0001TP tuning frames)")
    src.add_argument("--logits", default=None, metavar="FILE.pt", help="use saved {'logits', 'labels'}")
    src.add_argument("--save-logits", default=None, metavar="FILE.pt", help="save the calibration set's logits")
    src.add_argument("--frames", type=int, default=41, help="synthetic calibration frames")
    src.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    src.add_argument("--set-classes", type=int, default=11, help="classes of the synthetic calibration set")
    src.add_argument("--train-images", type=int, default=256, help="synthetic day scenes the U-Nets train on")
    src.add_argument("--train-steps", type=int, default=300)
    src.add_argument("--width", type=int, default=16, help="U-Net width")
    src.add_argument("--lr", type=float, default=2e-3)
    src.add_argument("--batch", type=int, default=8, help="training and calibration batch size")
    fit = p.add_argument_group("fits")
    fit.add_argument("--reward", default="miou")
    fit.add_argument("--max-sweeps", type=int, default=20, help="of both fits (streaming: passes)")
    fit.add_argument("--bins", type=int, default=1024, help="streaming threshold bins")
    fit.add_argument("--span", type=float, default=8.0, help="streaming bin range, +- logits")
    fit.add_argument("--grid-points", type=int, default=25)
    fit.add_argument("--grid-radius", type=float, default=3.0)
    fit.add_argument("--grid-max-sweeps", type=int, default=20)
    fit.add_argument("--reps", type=int, default=3, help="timed rounds of the exact fit and the pass costs")
    fit.add_argument("--flat-images", type=int, nargs="+", default=[8, 32, 128])
    big = p.add_argument_group("large streaming run (part 3)")
    big.add_argument("--stream-images", type=int, default=16)
    big.add_argument("--stream-size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"),
                     help="label size (Cityscapes: 1024 2048)")
    big.add_argument("--stream-scale", type=int, default=4, help="the model sees the images at 1/scale")
    big.add_argument("--classes", type=int, default=19)
    big.add_argument("--stream-reps", type=int, default=1, help="timed rounds of the pass costs")
    big.add_argument("--exact-limit-gb", type=float, default=2.0, help="run exact too when its logits fit")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which parts to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "calibrate.json"))
    args = p.parse_args(argv)
    if args.camvid and args.logits:
        p.error("give --camvid or --logits, not both")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t_start, cpu_start = time.perf_counter(), time.process_time()

    result = {"part_seconds": {}}
    if {"grid", "streaming"} & set(args.parts):
        src = source_of(args)
        logits, labels = collect(src.model, src.tune, args)
        if args.save_logits:
            torch.save({"logits": logits, "labels": labels}, args.save_logits)
        result.update(source=src.what, model_params=src.params)
    parts = {"grid": ("exact_vs_grid", lambda: part_exact_vs_grid(logits, labels, args), report_grid),
             "streaming": ("streaming_vs_exact", lambda: part_streaming(src, args), report_streaming),
             "large": ("large_streaming", lambda: part_large(args), report_large)}
    for part in args.parts:
        name, run, _ = parts[part]
        wall, cpu = time.perf_counter(), time.process_time()
        result[name] = run()
        # CPU seconds of this process: on a shared machine, closer to what an idle one takes (1 thread).
        result["part_seconds"][name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "argv")}
    result["command"] = "python benchmarks/calibrate.py " + " ".join(args.argv)
    result["machine"] = {**machine_info(), "device": args.device, "loadavg_before": load0,
                         "loadavg_after": os.getloadavg()}
    result["runtime_s"] = time.perf_counter() - t_start
    result["runtime_cpu_s"] = time.process_time() - cpu_start
    if "source" in result:
        print(f"\nCalibration set: {result['source']}")
    for part in args.parts:
        parts[part][2](result)
    print(f"\nload average {load0} -> {result['machine']['loadavg_after']} on {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; total {result['runtime_s']:.0f} s "
          f"({result['runtime_cpu_s']:.0f} CPU s; per part " +
          ", ".join(f"{k} {v['wall']:.0f} s" for k, v in result["part_seconds"].items()) + ")")
    print(f"wrote {write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
