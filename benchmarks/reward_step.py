"""Cost of a reward-tuning step vs a cross-entropy step, reward throughput, sampling cost.

    PYTHONPATH=src python benchmarks/reward_step.py                      # unet, batch 8, 96x128, 11 classes, CPU
    PYTHONPATH=src python benchmarks/reward_step.py --model segformer --variant tiny
    PYTHONPATH=src python benchmarks/reward_step.py --device cuda --size 512 1024 --classes 19 --amp bf16

Three measurements, side by side in one run, written to benchmarks/results/reward_step.json
(``--out`` to change):

1. **Training step**: one full step (forward, loss, backward, optimizer step) of the same model
   on the same batch with

   * ``ce``            -- plain cross-entropy (the reference),
   * ``reinforce_k4``  -- :class:`segreward.ReinforceLoss`, categorical sampler, K=4, loo baseline,
   * ``reinforce_k16`` -- the same with K=16,
   * ``coherent_k4``   -- the coherent (region) sampler, K=4,
   * ``local_image``   -- ``estimator="local"``, K=1: exact per-pixel credit of per-image mIoU,
   * ``local_batch``   -- the same with ``scope="batch"`` (mIoU of the batch's summed counts),

   and each one's ratio to the CE step (goals: ``reinforce_k4`` <= 1.10x, ``local_*`` <= 1.10x
   on CPU). Peak memory of one step per variant is reported next to CE: on CUDA
   ``max_memory_allocated`` (and its rise over the memory held before the step); on CPU the
   peak of the profiler's memory timeline of the step (tensors the step touches or creates). Each variant has
   its own copy of the model and optimizer (same initial weights). After ``--warmup`` untimed
   rounds, ``--reps`` rounds run the variants in a shuffled order each round (interleaved, so a
   burst of load from other processes hits all of them alike) and the median is reported, with
   the *paired* ratio the goals compare: the median over rounds of each step over the same
   round's CE step (a drift of the machine's speed between rounds cancels). The
   loss alone (loss forward + its backward into the logits, model excluded) is timed the same
   way, to show where the extra time goes.
2. **Reward throughput**: :func:`segreward.rewards.miou` on a batch of ``--reward-batch``
   label maps vs a per-image loop of torchmetrics' ``multiclass_jaccard_index`` (functional,
   ``average='macro'``, ``ignore_index``), images per second and the ratio (goal >= 20x). The
   two must agree (the largest difference is recorded).
3. **Sampling**: K categorical samples from logits ``[B, C, H, W]`` with the built-in sampler
   (inverse CDF) vs ``torch.distributions.Categorical`` and Gumbel-max, sampling only (no
   log-probability), for reference.

The machine may be shared with other processes: the figures are medians of interleaved runs
and still noisy; the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from segreward.models import build_model, count_parameters
from segreward.reinforce import ReinforceLoss
from segreward.rewards import miou
from segreward.sampling import CategoricalSampler

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _common import machine_info, write_result  # noqa: E402  (benchmarks/ is not a package)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_labels(n: int, h: int, w: int, classes: int, ignore_index: int, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant label maps (random rectangles over a background) with some ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (n, 1, 1), generator=g).expand(n, h, w).clone()
    for i in range(n):
        for _ in range(12):
            y, x, dy, dx, c = (int(torch.randint(0, m, (1,), generator=g))
                               for m in (h, w, max(3, h // 2), max(3, w // 2), classes))
            lab[i, y:y + dy + 2, x:x + dx + 2] = c
        lab[i, : max(1, h // 32)] = ignore_index  # a strip of unlabelled pixels, like a car bonnet
    return lab


def corrupt(labels: torch.Tensor, classes: int, ignore_index: int, p: float = 0.3, seed: int = 1) -> torch.Tensor:
    """A 'prediction': the labels with a fraction of pixels replaced by random classes."""
    g = torch.Generator().manual_seed(seed)
    pred = labels.clone()
    pred[pred == ignore_index] = 0
    noise = torch.rand(labels.shape, generator=g) < p
    pred[noise] = torch.randint(0, classes, (int(noise.sum()),), generator=g)
    return pred


# --------------------------------------------------------------------------- 1. training step

def build_variants(args, device):
    torch.manual_seed(0)
    opts = {"variant": args.variant} if args.model == "segformer" else {}
    base = build_model(args.model, args.classes, **opts).to(device)
    stride = getattr(base, "output_stride", 1)
    losses = {
        "ce": None,
        # The sampled estimator named explicitly: ReinforceLoss's defaults resolve to the local
        # estimator for count rewards (resolve_estimator), which is what local_batch measures.
        "reinforce_k4": ReinforceLoss(args.classes, k=4, estimator="sample", scope="image", ignore_index=args.ignore_index),
        "reinforce_k16": ReinforceLoss(args.classes, k=16, estimator="sample", scope="image",
                                       ignore_index=args.ignore_index),
        "coherent_k4": ReinforceLoss(args.classes, k=4, sampler="coherent", estimator="sample", scope="image",
                                     ignore_index=args.ignore_index),
        "local_image": ReinforceLoss(args.classes, estimator="local", scope="image", ignore_index=args.ignore_index),
        "local_batch": ReinforceLoss(args.classes, estimator="local", scope="batch", ignore_index=args.ignore_index),
    }
    if args.only:
        losses = {k: v for k, v in losses.items() if k in args.only}
    if args.skip:
        losses = {k: v for k, v in losses.items() if k not in args.skip or k == "ce"}
    variants = {}
    for name, loss in losses.items():
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants[name] = (model, opt, loss)
    return variants, count_parameters(base), stride


def ce_loss(logits, target, ignore_index):
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def autocast(args, device):
    if args.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def train_step(variant, x, y, args, device) -> float:
    model, opt, loss_fn = variant
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast(args, device):
        logits = model(x)
    # The loss runs in float32 (the samplers upcast anyway); the CE reference does the same.
    logits = logits.float()
    loss = ce_loss(logits, y, args.ignore_index) if loss_fn is None else loss_fn(logits, y)
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def loss_only(loss_fn, logits0, y, args, device) -> float:
    logits = logits0.detach().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    loss = ce_loss(logits, y, args.ignore_index) if loss_fn is None else loss_fn(logits, y)
    loss.backward()
    sync(device)
    return time.perf_counter() - t0


def bench_steps(args, device) -> dict:
    variants, n_params, stride = build_variants(args, device)
    b, (h, w) = args.batch, args.size
    torch.manual_seed(1)
    x = torch.randn(b, 3, h, w, device=device)
    y = make_labels(b, h, w, args.classes, args.ignore_index).to(device)
    with torch.no_grad():
        logits0 = variants["ce"][0](x).float()
    names = list(variants)
    step_t = {n: [] for n in names}
    loss_t = {n: [] for n in names}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    order = names[:]
    rng = random.Random(0)
    for rep in range(args.warmup + args.reps):
        rng.shuffle(order)
        for n in order:
            t = train_step(variants[n], x, y, args, device)
            tl = loss_only(variants[n][2], logits0, y, args, device)
            if rep >= args.warmup:
                step_t[n].append(t)
                loss_t[n].append(tl)
    memory = {}
    if device.type == "cuda":
        for n in names:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            train_step(variants[n], x, y, args, device)
            memory[n] = {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                         "step_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20}
    elif args.memory:
        for n in names:
            peak = cpu_peak_mb(lambda: train_step(variants[n], x, y, args, device))
            memory[n] = {"peak_mb": peak, "step_mb": peak}
    ce = statistics.median(step_t["ce"])
    ce_loss_t = statistics.median(loss_t["ce"])
    rows = {}
    for n in names:
        med = statistics.median(step_t[n])
        rows[n] = {
            "step_ms": 1000 * med,
            "step_ms_min": 1000 * min(step_t[n]),
            "step_ms_max": 1000 * max(step_t[n]),
            "ratio_to_ce": med / ce,
            # per round (each round runs every variant once, in shuffled order): the variant's step
            # over that round's CE step, then the median; a drift of the machine's speed between
            # rounds cancels (this VM's medians move by +-10% between runs)
            "paired_ratio_to_ce": statistics.median(t / c for t, c in zip(step_t[n], step_t["ce"])),
            "images_per_s": b / med,
            "loss_only_ms": 1000 * statistics.median(loss_t[n]),
            "loss_overhead_over_ce_ms": 1000 * (statistics.median(loss_t[n]) - ce_loss_t),
            **({"memory": memory[n], "memory_ratio_to_ce": memory[n]["step_mb"] / max(memory["ce"]["step_mb"], 1e-9)}
               if n in memory and "ce" in memory else {}),
        }
    return {"params": n_params, "output_stride": stride, "rows": rows}


def cpu_peak_mb(fn) -> float:
    """Peak memory (MB) of the tensors alive while ``fn()`` runs, from the profiler's memory
    timeline (CPU has no allocator statistics like CUDA's ``max_memory_allocated``)."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes) / 2**20


# --------------------------------------------------------------------------- 2. reward throughput

def bench_rewards(args) -> dict:
    from torchmetrics.functional.classification import multiclass_jaccard_index

    h, w = args.reward_size
    n = args.reward_batch
    target = make_labels(n, h, w, args.classes, args.ignore_index, seed=2)
    pred = corrupt(target, args.classes, args.ignore_index)

    def ours():
        return miou(pred, target, args.classes, args.ignore_index)

    def loop():
        return torch.stack([multiclass_jaccard_index(pred[i], target[i], args.classes, average="macro",
                                                     ignore_index=args.ignore_index) for i in range(n)])

    diff = float((ours().double() - loop().double()).abs().max())
    t_ours, t_loop = [], []
    for rep in range(1 + args.reward_reps):  # first round is warm-up; interleaved
        for fn, acc in ((ours, t_ours), (loop, t_loop)) if rep % 2 else ((loop, t_loop), (ours, t_ours)):
            t0 = time.perf_counter()
            fn()
            if rep:
                acc.append(time.perf_counter() - t0)
    mo, ml = statistics.median(t_ours), statistics.median(t_loop)
    return {"images": n, "size": [h, w], "ours_ms": 1000 * mo, "torchmetrics_loop_ms": 1000 * ml,
            "ours_images_per_s": n / mo, "torchmetrics_images_per_s": n / ml, "speedup": ml / mo,
            "max_abs_diff": diff}


# --------------------------------------------------------------------------- 3. sampling

def bench_sampling(args, device) -> dict:
    b, (h, w), c, k = args.batch, args.size, args.classes, 4
    torch.manual_seed(3)
    logits = torch.randn(b, c, h, w, device=device)
    sampler = CategoricalSampler()

    @torch.no_grad()
    def inverse_cdf():
        return sampler(logits, k)[0]

    @torch.no_grad()
    def distributions():
        return torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1)).sample((k,))

    @torch.no_grad()
    def gumbel():
        u = torch.rand(k, *logits.shape, device=device).clamp_(1e-20, 1)
        return (logits.unsqueeze(0) - torch.log(-torch.log(u))).argmax(2)

    fns = {"segreward_categorical": inverse_cdf, "torch_distributions": distributions, "gumbel_max": gumbel}
    times = {n: [] for n in fns}
    order = list(fns)
    rng = random.Random(1)
    for rep in range(1 + args.reps):
        rng.shuffle(order)
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            if rep:
                times[n].append(time.perf_counter() - t0)
    ref = statistics.median(times["segreward_categorical"])
    return {"k": k, "shape": [b, c, h, w],
            "rows": {n: {"ms": 1000 * statistics.median(t), "ratio_to_ours": statistics.median(t) / ref}
                     for n, t in times.items()}}


# --------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", choices=["unet", "segformer"])
    p.add_argument("--variant", default="b0", help="segformer variant (tiny, b0, b1, b2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed interleaved rounds of the step variants")
    p.add_argument("--skip", nargs="*", default=[], help="step variants to leave out (reinforce_k16, coherent_k4, ...)")
    p.add_argument("--only", nargs="*", default=[], help="step variants to run (ce is always kept)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU peak-memory measurement")
    p.add_argument("--reward-batch", type=int, default=64)
    p.add_argument("--reward-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: --size")
    p.add_argument("--reward-reps", type=int, default=5)
    p.add_argument("--no-reward", action="store_true", help="skip the reward throughput part")
    p.add_argument("--out", default=str(ROOT / "results" / "reward_step.json"))
    args = p.parse_args(argv)
    args.reward_size = args.reward_size or args.size
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        args.only = list(dict.fromkeys(["ce", *args.only]))
    device = torch.device(args.device)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None

    steps = bench_steps(args, device)
    sampling = bench_sampling(args, device)
    rewards = None if args.no_reward else bench_rewards(args)

    h, w = args.size
    print(f"\nTraining step: {args.model}{'-' + args.variant if args.model == 'segformer' else ''} "
          f"({steps['params'] / 1e6:.2f} M params), batch {args.batch} at {h}x{w}, {args.classes} classes, "
          f"{device}, amp {args.amp}, {torch.get_num_threads()} threads; median of {args.reps} interleaved rounds")
    print(f"{'variant':<15}{'step ms':>9}{'min':>8}{'max':>8}{'x CE':>7}{'paired':>7}{'img/s':>8}{'loss ms':>9}"
          f"{'+loss ms':>9}{'peak MB':>9}{'step MB':>9}{'x CE':>7}")
    for n, r in steps["rows"].items():
        mem = r.get("memory")
        mem_s = f"{mem['peak_mb']:9.0f}{mem['step_mb']:9.0f}{r['memory_ratio_to_ce']:7.2f}" if mem else ""
        print(f"{n:<15}{r['step_ms']:9.1f}{r['step_ms_min']:8.1f}{r['step_ms_max']:8.1f}{r['ratio_to_ce']:7.2f}"
              f"{r['paired_ratio_to_ce']:7.2f}{r['images_per_s']:8.1f}{r['loss_only_ms']:9.1f}{r['loss_overhead_over_ce_ms']:9.1f}{mem_s}")
    print("  (x CE: median step over CE's median step; paired: median over rounds of the step over that round's CE"
          " step, what the goals compare;")
    print("   loss ms: the loss alone, forward + backward into the logits; +loss ms: over the CE loss;")
    print("   peak MB: peak memory of a step (CPU: profiler memory timeline; CUDA: max_memory_allocated);"
          " step MB: above what was held before it)")
    print(f"\nSampling K={sampling['k']} from logits {tuple(sampling['shape'])} (no log-prob), median ms")
    for n, r in sampling["rows"].items():
        print(f"{n:<24}{r['ms']:9.2f}{r['ratio_to_ours']:7.2f}x")
    if rewards:
        print(f"\nPer-image mIoU of {rewards['images']} maps at {rewards['size'][0]}x{rewards['size'][1]}: "
              f"segreward.rewards.miou {rewards['ours_ms']:.1f} ms ({rewards['ours_images_per_s']:.0f} img/s) vs "
              f"torchmetrics per-image loop {rewards['torchmetrics_loop_ms']:.1f} ms "
              f"({rewards['torchmetrics_images_per_s']:.0f} img/s): {rewards['speedup']:.1f}x "
              f"(max |diff| {rewards['max_abs_diff']:.1e})")
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    goals = {"reinforce_k4_at_most_1.10x_ce": steps["rows"]["reinforce_k4"]["paired_ratio_to_ce"] <= 1.10
             if "reinforce_k4" in steps["rows"] else None,
             **{f"{n}_at_most_1.10x_ce": steps["rows"][n]["paired_ratio_to_ce"] <= 1.10
                for n in ("local_image", "local_batch") if n in steps["rows"]},
             "reward_speedup_at_least_20x": rewards["speedup"] >= 20 if rewards else None}
    print(f"\nGoals: {goals}; load average {load0} -> {load1} on {os.cpu_count()} CPUs "
          "(shared machine: figures are noisy)")
    result = {
        "command": "python benchmarks/reward_step.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {**machine_info(), "device": str(device), "loadavg_before": load0, "loadavg_after": load1},
        "step": steps, "sampling": sampling, "reward": rewards, "goals": goals,
    }
    print(f"wrote {write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
