"""CamVid day -> dusk: does reward tuning beat the alternatives?  (issue 6, part 3)

Source = day sequences 0006R0 + 0016E5 of ``train/``; day val = ``val/`` (0016E5);
target = dusk 0001TP of ``train/``, split by frame number: the first 2/3 tune, the last 1/3
is held out for evaluation. Frames are downscaled (``--size``, default 96x128) and decoded once
per process into in-memory tensors that every run reuses.

Per seed: CE pretraining on the source (``--pretrain-steps``) -> checkpoint ``src``; CE
fine-tuning of ``src`` on the target-tune labels (``--finetune-steps``) -> checkpoint ``ce``.
Then, each method from the same checkpoint with the same budget (steps x batch):

* ``after_ce``    from ``ce``, ``--extra-steps`` more steps of each method;
* ``from_source`` from ``src``, ``--source-steps`` steps of each method on the target labels;
* ``uda``         from ``src``, ``--uda-steps`` steps without target labels: ``self_training``
                  (CE on the start model's confident pseudo-labels) vs ``reinforce_pseudo_*``
                  (ReinforceLoss against the same pseudo-labels).

Methods: ``ce``, ``lovasz``, ``reward_weighted_ce``, ``reinforce_<sampler>_<baseline>[_ce]``
(samplers categorical/coherent, baselines loo/greedy, ``_ce`` = CE anchor of weight 1) and two
attempts at closing the gap: ``..._wmiou`` (class-weighted mIoU reward, weights from the tuning
labels) and ``..._kl`` (KL to the starting model, a trust region).

    PYTHONPATH=src python benchmarks/camvid_da.py --root ../shared/data/camvid

writes ``results/camvid_da.json`` and ``results/camvid_da.md``. The training loop is our own
small loop over the library pieces (build_model, ReinforceLoss, RewardWeightedCELoss,
LovaszSoftmaxLoss, segreward.engine.trainer.evaluate), because the trainer builds its datasets
from config dicts per run and so cannot share one decoded copy across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from segreward.data.formats import CamVidDataset
from segreward.engine.trainer import evaluate
from segreward.lovasz import LovaszSoftmaxLoss
from segreward.models import build_model
from segreward.reinforce import ReinforceLoss, RewardWeightedCELoss

NUM_CLASSES, IGNORE = 11, 255
DAY, DUSK = ("0006R0", "0016E5"), "0001TP"
PROTOCOLS = ("after_ce", "from_source", "uda")
LABELLED = ["ce", "lovasz", "reward_weighted_ce"] + [
    f"reinforce_{s}_{b}{a}" for s in ("categorical", "coherent") for b in ("loo", "greedy") for a in ("", "_ce")]
EXTRA = ["reinforce_categorical_loo_ce_wmiou", "reinforce_categorical_loo_ce_kl", "reinforce_categorical_loo_ce_norm",
         "reinforce_coherent_loo_ce_norm"]
UDA = ["self_training", "reinforce_pseudo_categorical_loo", "reinforce_pseudo_categorical_loo_ce",
       "reinforce_pseudo_categorical_loo_ce_norm"]
DEFAULT_METHODS = {"after_ce": LABELLED + EXTRA, "from_source": LABELLED, "uda": UDA}
DIAG_KEYS = ("reward_mean", "reward_std", "adv_std", "greedy_reward", "entropy", "weight_std", "kl")


# ----------------------------------------------------------------------------- data
def to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a dataset once into ``X [N,3,H,W] float32`` (normalised) and ``Y [N,H,W] int64``."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def load_data(root: str, size, eval_root: str | None, eval_split: str, source_every: int = 1) -> dict:
    kw = dict(size=tuple(size), cache=False)
    data = {
        "source": CamVidDataset(root, "train", sequences=list(DAY), **kw),
        "target_tune": CamVidDataset(root, "train", sequences=DUSK, frames=(0, 2 / 3), **kw),
    }
    if eval_root is None:
        data["target_eval"] = CamVidDataset(root, "train", sequences=DUSK, frames=(2 / 3, 1), **kw)
        data["source_eval"] = CamVidDataset(root, "val", **kw)
    else:
        data["target_eval"] = CamVidDataset(eval_root, eval_split, sequences=DUSK, **kw)
        try:
            data["source_eval"] = CamVidDataset(eval_root, eval_split, exclude_sequences=DUSK, **kw)
        except ValueError:  # the eval split holds dusk frames only: keep the day val of --root
            data["source_eval"] = CamVidDataset(root, "val", **kw)
    out = {}
    for name, ds in tqdm(list(data.items()), desc="decode", leave=False):
        out[name] = to_tensors(ds)
        out[name + "_names"] = list(ds.names)
    if source_every > 1:  # val/ interleaves with train frames: a subsample measures the same fit, faster
        x, y = out["source_eval"]
        out["source_eval"] = (x[::source_every], y[::source_every])
        out["source_eval_names"] = out["source_eval_names"][::source_every]
    out["classes"] = list(data["source"].meta.classes)
    return out


def class_weights_from(y: torch.Tensor) -> list[float]:
    """Inverse-sqrt pixel frequency of the tuning labels, mean 1 over the classes present."""
    counts = torch.bincount(y[y != IGNORE].flatten(), minlength=NUM_CLASSES).double()
    freq = counts / counts.sum()
    w = torch.where(freq > 0, freq.clamp_min(1e-6).rsqrt(), torch.zeros_like(freq))
    return (w / w[freq > 0].mean()).tolist()


# ----------------------------------------------------------------------------- training
class Batches:
    """Endless shuffled batches (fixed by the seed) with random horizontal flips."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.g), 0

    def next(self):
        idx = []
        while len(idx) < self.batch:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            take = min(self.batch - len(idx), self.n - self.pos)
            idx += self.perm[self.pos:self.pos + take].tolist()
            self.pos += take
        flip = torch.rand(len(idx), generator=self.g) < 0.5
        return torch.tensor(idx), flip


def make_loss(method: str, cfg, class_weights):
    """The loss module of a method name, and the KL weight to the start model (0: none)."""
    name = method.replace("reinforce_pseudo_", "reinforce_")
    if name in ("ce", "self_training"):
        return (lambda logits, y: F.cross_entropy(logits, y, ignore_index=IGNORE)), 0.0
    if name == "lovasz":
        return LovaszSoftmaxLoss(IGNORE), 0.0
    if name == "reward_weighted_ce":
        return RewardWeightedCELoss(NUM_CLASSES, IGNORE), 0.0
    parts = name.split("_")
    if parts[0] != "reinforce" or len(parts) < 3:
        raise SystemExit(f"unknown method {method!r}")
    sampler, baseline, flags = parts[1], parts[2], set(parts[3:])
    reward, kwargs = "miou", {}
    if "wmiou" in flags:
        reward, kwargs = "weighted_miou", {"class_weights": class_weights}
    loss = ReinforceLoss(NUM_CLASSES, reward=reward, sampler=sampler, k=cfg.k, baseline=baseline,
                         temperature=cfg.temperature, ce_weight=1.0 if "ce" in flags else 0.0,
                         normalize="norm" in flags,
                         ignore_index=IGNORE, block=cfg.block, reward_kwargs=kwargs)
    return loss, (cfg.kl_weight if "kl" in flags else 0.0)


def train_steps(model, X, Y, steps, lr, batch, seed, loss_fn, kl_weight=0.0, start=None, bar=None):
    """Adam for ``steps`` steps; returns the mean of the loss's diagnostics over the steps."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = Batches(len(X), batch, seed)
    sums: dict[str, float] = {}
    model.train()
    for _ in range(steps):
        idx, flip = batches.next()
        x, y = X[idx], Y[idx]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        logits = model(x)
        loss = loss_fn(logits, y)
        diag = dict(getattr(loss_fn, "diagnostics", {}) or {})
        if kl_weight > 0:
            with torch.no_grad():
                ref = F.log_softmax(start(x), 1)
            logp = F.log_softmax(logits, 1)
            kl = (ref.exp() * (ref - logp)).sum(1).mean()  # KL(start || current) per pixel
            loss = loss + kl_weight * kl
            diag["kl"] = float(kl.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in diag.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if bar is not None:
            bar.update(1)
    return {k: v / max(1, steps) for k, v in sums.items()}


def score(model, data) -> dict:
    t = evaluate(model, TensorDataset(*data["target_eval"]), NUM_CLASSES, IGNORE, batch_size=16)
    s = evaluate(model, TensorDataset(*data["source_eval"]), NUM_CLASSES, IGNORE, batch_size=16)
    return {"target_mIoU": t["mIoU"], "source_mIoU": s["mIoU"], "target_IoU": t["IoU"], "source_IoU": s["IoU"]}


@torch.no_grad()
def pseudo_labels(model, X, threshold, batch=16):
    model.eval()
    out = []
    for i in range(0, len(X), batch):
        conf, lab = torch.softmax(model(X[i:i + batch]), 1).max(1)
        out.append(torch.where(conf >= threshold, lab, torch.full_like(lab, IGNORE)))
    model.train()
    return torch.cat(out)


# ----------------------------------------------------------------------------- benchmark
def run(args) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data(args.root, args.size, args.eval_root, args.eval_split, args.source_eval_every)
    Xs, Ys = data["source"]
    Xt, Yt = data["target_tune"]
    weights = class_weights_from(Yt)
    if args.methods is None:
        methods = {p: list(DEFAULT_METHODS[p]) for p in args.protocols}
    else:  # any labelled method may run in after_ce and from_source
        methods = {p: [m for m in (UDA if p == "uda" else LABELLED + EXTRA) if m in args.methods] for p in args.protocols}
    previous = []
    out_json = Path(args.out).with_suffix(".json")
    if args.append and out_json.exists():
        old = json.loads(out_json.read_text())
        previous = old["runs"]
        args.prev_runtime_s = float(old.get("runtime_s", 0.0))
        args.prev_commands = old["config"].get("commands", [old["config"].get("command")])
    done = {(r["protocol"], r["method"], r["seed"]) for r in previous}
    per_seed = (args.pretrain_steps + args.finetune_steps
                + len(methods.get("after_ce", [])) * args.extra_steps
                + len(methods.get("from_source", [])) * args.source_steps
                + len(methods.get("uda", [])) * args.uda_steps)
    print(f"data: source {len(Xs)}, target tune {len(Xt)}, target eval {len(data['target_eval'][0])}, "
          f"source eval {len(data['source_eval'][0])} frames at {args.size[0]}x{args.size[1]}; "
          f"{per_seed} steps per seed", flush=True)
    runs: list[dict] = list(previous)
    bar = tqdm(total=per_seed * len(args.seeds), desc="camvid_da", dynamic_ncols=True)

    def record(protocol, method, seed, model, steps, diag=None, t0=None):
        s = score(model, data)
        if (protocol, method, seed) in done:  # a shared starting point already recorded: check it reproduces
            old = next(r for r in previous if (r["protocol"], r["method"], r["seed"]) == (protocol, method, seed))
            tqdm.write(f"seed {seed} {protocol} {method}: recorded target {old['target_mIoU']}, "
                       f"now {s['target_mIoU']:.3f} (rebuilt checkpoint)")
            return old
        row = {"protocol": protocol, "method": method, "seed": seed, "steps": steps,
               "target_mIoU": round(s["target_mIoU"], 3), "source_mIoU": round(s["source_mIoU"], 3),
               "target_IoU": [round(v, 2) for v in s["target_IoU"]],
               "source_IoU": [round(v, 2) for v in s["source_IoU"]],
               **{k: round(v, 5) for k, v in (diag or {}).items()},
               "time_s": round(time.perf_counter() - t0, 1) if t0 else None}
        runs.append(row)
        bar.set_postfix(last=f"{protocol}/{method} {row['target_mIoU']:.1f}", refresh=False)
        tqdm.write(f"seed {seed} {protocol:11s} {method:38s} target {row['target_mIoU']:6.2f} "
                   f"source {row['source_mIoU']:6.2f} " + " ".join(f"{k}={v:.4g}" for k, v in (diag or {}).items()))
        save(args, runs, data, t_start, weights, partial=True)
        return row

    for seed in args.seeds:
        torch.manual_seed(seed)
        model = build_model("unet", NUM_CLASSES, width=args.width)
        t0 = time.perf_counter()
        ce = make_loss("ce", args, weights)[0]
        train_steps(model, Xs, Ys, args.pretrain_steps, args.pretrain_lr, args.batch, seed, ce, bar=bar)
        src = {k: v.clone() for k, v in model.state_dict().items()}
        row = record("from_source", "source_only", seed, model, 0, t0=t0)
        if "uda" in methods:
            if ("uda", "source_only", seed) not in done:
                runs.append({**row, "protocol": "uda"})
        t0 = time.perf_counter()
        train_steps(model, Xt, Yt, args.finetune_steps, args.lr, args.batch, seed + 1, ce, bar=bar)
        ce_state = {k: v.clone() for k, v in model.state_dict().items()}
        if "after_ce" in methods:
            record("after_ce", "ce_finetuned", seed, model, 0, t0=t0)
        for protocol in args.protocols:
            start_state = ce_state if protocol == "after_ce" else src
            steps = {"after_ce": args.extra_steps, "from_source": args.source_steps, "uda": args.uda_steps}[protocol]
            lr = {"after_ce": args.extra_lr, "from_source": args.lr, "uda": args.uda_lr}[protocol]
            Ytrain = Yt
            if protocol == "uda":
                model.load_state_dict(src)
                Ytrain = pseudo_labels(model, Xt, args.threshold)
            for method in methods[protocol]:
                t0 = time.perf_counter()
                model.load_state_dict(start_state)
                start_model = None
                loss_fn, kl_weight = make_loss(method, args, weights)
                if kl_weight > 0:
                    start_model = build_model("unet", NUM_CLASSES, width=args.width)
                    start_model.load_state_dict(start_state)
                    start_model.eval().requires_grad_(False)
                diag = train_steps(model, Xt, Ytrain, steps, lr, args.batch, seed + 2, loss_fn, kl_weight,
                                   start_model, bar=bar)
                if protocol == "uda":
                    diag["pseudo_fraction"] = float((Ytrain != IGNORE).float().mean())
                record(protocol, method, seed, model, steps, diag, t0=t0)
    bar.close()
    result = save(args, runs, data, t_start, weights, partial=False)
    print(f"total runtime {result['runtime_s']:.0f} s on {torch.get_num_threads()} CPU thread(s) "
          f"({platform.processor() or platform.machine()})", flush=True)
    return result


# ----------------------------------------------------------------------------- output
def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["protocol"], r["method"]), []).append(r)
    rows = []
    for (p, m), rs in groups.items():
        t = np.array([r["target_mIoU"] for r in rs])
        s = np.array([r["source_mIoU"] for r in rs])
        row = {"protocol": p, "method": m, "n": len(rs), "target_mean": float(t.mean()),
               "target_std": float(t.std(ddof=1)) if len(t) > 1 else 0.0, "source_mean": float(s.mean()),
               "source_std": float(s.std(ddof=1)) if len(s) > 1 else 0.0}
        for k in ("reward_std", "adv_std", "entropy", "pseudo_fraction"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                row[k] = float(np.mean(vals))
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["# CamVid day -> dusk benchmark", "",
             "Commands: " + "; then ".join(f"`{c}`" for c in cfg["commands"]) + "  ", f"Total runtime: {result['runtime_s']:.0f} s "
             f"({cfg['threads']} CPU threads, machine shared with other jobs). Seeds: {cfg['seeds']}.", "",
             f"Data: {cfg['frames']}. Frames at {cfg['size'][0]}x{cfg['size'][1]}. U-Net width {cfg['width']}.",
             f"Steps (batch {cfg['batch']}): pretrain {cfg['pretrain_steps']} (lr {cfg['pretrain_lr']}), "
             f"CE fine-tune {cfg['finetune_steps']} (lr {cfg['lr']}), after_ce extra {cfg['extra_steps']} "
             f"(lr {cfg['extra_lr']}), from_source {cfg['source_steps']} (lr {cfg['lr']}), uda {cfg['uda_steps']} "
             f"(lr {cfg['uda_lr']}, pseudo-label threshold {cfg['threshold']}). REINFORCE: K={cfg['k']}, "
             f"temperature {cfg['temperature']}, coherent block {cfg['block']}, KL weight {cfg['kl_weight']}.", "",
             "Target = held-out last third of the dusk clip 0001TP; source = day val (0016E5). "
             "mIoU in percent, mean ± std over seeds. reward_std = std of the reward across the K samples of an "
             "image (mean over images and steps); adv_std = std of the advantages in a batch.", ""]
    for p in PROTOCOLS:
        rows = [r for r in result["summary"] if r["protocol"] == p]
        if not rows:
            continue
        lines += [f"## {p}", "", "| method | n | target mIoU | source mIoU | reward_std | adv_std | entropy |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: -r["target_mean"]):
            f = lambda k: f"{r[k]:.4f}" if k in r else ""
            lines.append(f"| {r['method']} | {r['n']} | {r['target_mean']:.2f} ± {r['target_std']:.2f} | "
                         f"{r['source_mean']:.2f} ± {r['source_std']:.2f} | {f('reward_std')} | {f('adv_std')} | "
                         f"{f('entropy')} |")
        trained = [r for r in rows if r["method"] not in ("source_only", "ce_finetuned")]
        best = sorted(trained, key=lambda r: -r["target_mean"])[:2]
        if best:
            classes = result["config"]["classes"]
            lines += ["", f"Per-class target IoU (mean over seeds), best two of {p}:", "",
                      "| method | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
            for b in best:
                ious = np.mean([r["target_IoU"] for r in result["runs"]
                                if r["protocol"] == p and r["method"] == b["method"]], axis=0)
                lines.append(f"| {b['method']} | " + " | ".join(f"{v:.1f}" for v in ious) + " |")
        lines.append("")
    return "\n".join(lines)


def save(args, runs, data, t_start, weights, partial: bool) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "prev_runtime_s", "prev_commands")}
    cfg["command"] = "python " + " ".join(sys.argv)
    cfg["commands"] = list(getattr(args, "prev_commands", [])) + [cfg["command"]]
    cfg["classes"] = data["classes"]
    cfg["reward_class_weights"] = [round(w, 4) for w in weights]
    cfg["frames"] = (f"source {len(data['source'][0])} day frames (0006R0+0016E5, train), target tune "
                     f"{len(data['target_tune'][0])} ({data['target_tune_names'][0]}..{data['target_tune_names'][-1]}), "
                     f"target eval {len(data['target_eval'][0])} ({data['target_eval_names'][0]}.."
                     f"{data['target_eval_names'][-1]}), source eval {len(data['source_eval'][0])}")
    result = {"runs": runs, "summary": summarize(runs), "config": cfg,
              "runtime_s": round(time.perf_counter() - t_start + getattr(args, "prev_runtime_s", 0.0), 1), "complete": not partial}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="../shared/data/camvid", help="CamVid folder (train/, trainannot/, val/, ...)")
    p.add_argument("--eval-root", default=None, help="evaluate on this CamVid-layout folder instead (tuning unchanged)")
    p.add_argument("--eval-split", default="test", help="split of --eval-root to evaluate on")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--methods", nargs="+", default=None, help="subset of method names (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", nargs=2, type=int, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--width", type=int, default=16, help="U-Net width")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="CE fine-tuning and from_source lr")
    p.add_argument("--steps", "--extra-steps", dest="extra_steps", type=int, default=50,
                   help="after_ce extra budget (steps)")
    p.add_argument("--extra-lr", type=float, default=3e-4)
    p.add_argument("--source-steps", type=int, default=50)
    p.add_argument("--uda-steps", type=int, default=50)
    p.add_argument("--uda-lr", type=float, default=3e-4)
    p.add_argument("--threshold", type=float, default=0.8, help="pseudo-label confidence threshold")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block", type=int, default=16, help="coherent sampler region size (pixels)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--source-eval-every", type=int, default=4, help="score every N-th day val frame (1: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a loaded shared machine)")
    p.add_argument("--append", action="store_true",
                   help="add runs to the existing --out JSON (checkpoints are rebuilt from the same seeds)")
    p.add_argument("--out", default="results/camvid_da", help="output path without suffix (.json and .md)")
    args = p.parse_args(argv)
    if args.methods:
        known = set(LABELLED + EXTRA + UDA)
        bad = sorted(set(args.methods) - known)
        if bad:
            p.error(f"unknown methods {bad}; known: {sorted(known)}")
    return args


if __name__ == "__main__":
    run(parse())
