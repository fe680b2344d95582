"""Reward-tuning step vs cross-entropy step on a GPU at a Cityscapes-like size, with AMP.

    PYTHONPATH=src python benchmarks/gpu_step.py                         # CUDA: batch 8 at 512x1024, SegFormer-B0, 19 classes, bf16
    PYTHONPATH=src python benchmarks/gpu_step.py --device cpu --size 64 128 --batch 2 --variant tiny --amp none --iters 2

Run by ``benchmarks/gpu_check.sh``. For each variant -- ``ce`` (plain cross-entropy) and
``reinforce_k4`` (:class:`segreward.ReinforceLoss`, categorical sampler, K=4, loo baseline;
plus ``coherent_k4``, ``reinforce_k16`` and the local estimator ``local_image`` / ``local_batch``
(exact per-pixel credit, K=1) unless ``--only``) -- a fresh copy of the same
randomly initialised model does ``--warmup`` untimed steps, then ``--iters`` timed steps (forward
under autocast, loss in float32, backward, AdamW step). Reported: ms per step, images/s, ratio to
the CE step, and peak memory (``torch.cuda.max_memory_allocated``, reset before each variant).
Writes ``gpu_step.json`` to ``--out-dir`` (default ``$OUT`` if set, else benchmarks/results).
The model is SegFormer (``transformers``) when importable, else the built-in U-Net at width 32
(said in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from segreward.models import build_model, count_parameters
from segreward.reinforce import ReinforceLoss

ROOT = Path(__file__).resolve().parent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, device):
    torch.manual_seed(0)
    if args.model == "segformer":
        try:
            return build_model("segformer", args.classes, variant=args.variant).to(device), f"segformer-{args.variant}"
        except Exception as e:  # transformers missing: say so and fall back
            print(f"segformer unavailable ({e}); using the built-in unet (width 32)")
    return build_model("unet", args.classes, width=32).to(device), "unet-w32"


def labels(b, h, w, classes, device):
    """Blocky label maps (16x16 cells of random classes) with a strip of ignore pixels."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (b, (h + 15) // 16, (w + 15) // 16), generator=g)
    y = y.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :h, :w].contiguous()
    y[:, -h // 16:] = 255
    return y.to(device)


def run_variant(name, args, device, x, y):
    model, model_name = make_model(args, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = None
    if name.startswith("local_"):  # exact per-pixel credit, K=1, scope image or batch
        loss_fn = ReinforceLoss(args.classes, estimator="local", scope=name.split("_", 1)[1])
    elif name != "ce":
        k = int(name.rsplit("k", 1)[1])
        # sampled REINFORCE named explicitly (the defaults resolve count rewards to the local estimator)
        loss_fn = ReinforceLoss(args.classes, k=k, sampler="coherent" if name.startswith("coherent") else "categorical",
                                estimator="sample", scope="image")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
           if args.amp != "none" else nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = model(x)
        logits = logits.float()
        if loss_fn is None:
            up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up, y, ignore_index=255)
        else:
            loss = loss_fn(logits, y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    med = statistics.median(times)
    row = {"step_ms": 1000 * med, "step_ms_min": 1000 * min(times), "images_per_s": args.batch / med,
           "peak_mem_gib": peak, "loss": float(loss.detach())}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, model_name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="segformer", choices=["segformer", "unet"])
    p.add_argument("--variant", default="b0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: ce reinforce_k4 coherent_k4 reinforce_k16 local_image local_batch)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or str(ROOT / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    b, (h, w) = args.batch, args.size
    torch.manual_seed(2)
    x = torch.randn(b, 3, h, w, device=device)
    y = labels(b, h, w, args.classes, device)
    names = args.only or ["ce", "reinforce_k4", "coherent_k4", "reinforce_k16", "local_image", "local_batch"]
    rows, model_name = {}, None
    for n in names:
        rows[n], model_name = run_variant(n, args, device, x, y)
    ce = rows["ce"]["step_ms"] if "ce" in rows else None
    for r in rows.values():
        r["ratio_to_ce"] = r["step_ms"] / ce if ce else None
    params = count_parameters(make_model(args, torch.device("cpu"))[0])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n{model_name} ({params / 1e6:.2f} M params), batch {b} at {h}x{w}, {args.classes} classes, "
          f"amp {args.amp}, {gpu}; median of {args.iters} steps after {args.warmup} warm-up")
    print(f"{'variant':<15}{'step ms':>9}{'x CE':>7}{'img/s':>8}{'peak GiB':>10}")
    for n, r in rows.items():
        mem = f"{r['peak_mem_gib']:10.2f}" if r["peak_mem_gib"] is not None else f"{'-':>10}"
        ratio = f"{r['ratio_to_ce']:7.2f}" if r["ratio_to_ce"] else f"{'-':>7}"
        print(f"{n:<15}{r['step_ms']:9.1f}{ratio}{r['images_per_s']:8.1f}{mem}")
    result = {"command": "python benchmarks/gpu_step.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "model": model_name, "params": params, "device": gpu, "torch": torch.__version__,
              "cuda": torch.version.cuda, "settings": vars(args), "rows": rows}
    out = Path(args.out_dir) / "gpu_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
