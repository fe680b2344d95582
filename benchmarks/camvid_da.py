"""CamVid day -> dusk: does reward tuning beat the alternatives?  Every run goes through the trainer.

Data. Source = day sequences 0006R0 + 0016E5 of ``train/``; day val = ``val/`` (0016E5);
target = dusk 0001TP of ``train/``, split by frame number: the first 2/3 tune, the last 1/3 is
held out for evaluation. ``--eval-root DIR`` (a CamVid-layout folder with a ``--eval-split``,
default ``test``) replaces the held-out third: its 0001TP frames are the target evaluation, its
other frames the source evaluation (``--root``'s day val when it has none). Frames are
downscaled (``--size``) and decoded once per process into :class:`InMemoryDataset` tensors
that every run shares.

Protocol, per seed. CE pretraining on the source (``--pretrain-steps``) -> checkpoint ``src``
(row ``source_only``); CE fine-tuning of ``src`` on the target-tune labels (``--finetune-steps``)
-> checkpoint ``ce`` (row ``ce_finetuned``). Then each method from the same checkpoint with the
same budget (steps x batch) and the same batch order:

* ``after_ce``    from ``ce``, ``--steps`` more steps of each method on the target-tune labels;
* ``from_source`` from ``src``, ``--source-steps`` steps of each method on the target-tune labels;
* ``uda``         from ``src``, ``--uda-steps`` steps without target labels, against the
                  pseudo-labels of the frozen ``src`` model (``pseudo_label.enabled``).

Methods (config of the trainer in brackets):

* ``ce`` [loss.type=ce], ``lovasz`` [loss.type=lovasz], ``reward_weighted_ce``;
* ``reinforce_<sampler>_<baseline>`` [loss.type=reinforce, sampled estimator, K=``--k``];
* ``local_<scope>`` [loss.type=reinforce, loss.estimator=local, loss.scope=image|batch|running, loss.k=1];
* uda: ``self_training`` (CE on the pseudo-labels), ``local_pseudo_<scope>``, ``reinforce_pseudo_<sampler>_<baseline>``;
* suffixes: ``_ce`` CE anchor of weight ``--ce-anchor`` [loss.ce_weight], ``_kl`` KL to the
  starting model [loss.kl_weight=``--kl-weight``], ``_wmiou`` class-weighted mIoU reward
  (inverse-sqrt pixel frequency of the tuning labels), ``_norm`` normalised advantages.

Each run is a trainer run directory under ``--work`` (default: a temporary folder); it evaluates
once, at its end. Statistics: mean ± std over seeds and the seed-paired difference to ``ce``
(``self_training`` in uda); per-class IoU; the mean of each logged diagnostic over the run.

    PYTHONPATH=src python benchmarks/camvid_da.py --root ../shared/data/camvid --seeds 0 1 2 3 4

writes ``results/camvid_da.json`` and ``results/camvid_da.md``, rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from segreward.data.formats import CamVidDataset
from segreward.data.memory import InMemoryDataset
from segreward.engine import config_from_dict, train
from segreward.runlog import load_run

NUM_CLASSES, IGNORE = 11, 255
DAY, DUSK = ("0006R0", "0016E5"), "0001TP"
PROTOCOLS = ("after_ce", "from_source", "uda")
SCOPES = ("image", "batch", "running")
LABELLED = ["ce", "lovasz", "reinforce_categorical_greedy_ce"] + [f"local_{s}{a}" for a in ("", "_ce") for s in SCOPES]
UDA = ["self_training", "local_pseudo_batch"]
REFERENCE = {"after_ce": "ce", "from_source": "ce", "uda": "self_training"}
STARTS = ("source_only", "ce_finetuned")
FLAGS = ("ce", "kl", "wmiou", "norm")
# Logged scalars that describe the run's bookkeeping, not the loss: left out of the diagnostics.
NOT_DIAGNOSTICS = {"step", "iter", "lr", "data_time", "time", "memory"}
DIAG_ORDER = ("reward_mean", "reward_std", "adv_std", "greedy_reward", "credit_abs", "credit_label_pos", "entropy",
              "kl", "pseudo_fraction")


# ----------------------------------------------------------------------------- methods
def method_loss(method: str, args, reward_weights: list[float]) -> dict:
    """The trainer config sections (``loss``, ``pseudo_label``) of a method name."""
    pseudo = method == "self_training" or "_pseudo_" in method
    name = "ce" if method == "self_training" else method.replace("_pseudo_", "_")
    parts = name.split("_")
    flags: set[str] = set()
    while parts and parts[-1] in FLAGS and len(parts) > 1 and "_".join(parts) not in ("reward_weighted_ce",):
        flags.add(parts.pop())
    base = "_".join(parts)
    if base in ("ce", "lovasz", "reward_weighted_ce"):
        loss = {"type": base}
    elif parts[0] == "reinforce" and len(parts) == 3:
        loss = {"type": "reinforce", "estimator": "sample", "sampler": parts[1], "baseline": parts[2], "k": args.k,
                "temperature": args.temperature, "block": args.block, "normalize": "norm" in flags}
    elif parts[0] == "local" and len(parts) == 2 and parts[1] in SCOPES:
        loss = {"type": "reinforce", "estimator": "local", "scope": parts[1], "k": 1, "momentum": args.momentum}
    else:
        raise ValueError(f"unknown method {method!r}")
    if flags - {"kl"} and loss["type"] != "reinforce":
        raise ValueError(f"method {method!r}: suffixes {sorted(flags - {'kl'})} apply to reinforce/local methods only")
    if "ce" in flags:
        loss["ce_weight"] = args.ce_anchor
    if "wmiou" in flags:
        loss["reward"], loss["reward_class_weight"] = "weighted_miou", reward_weights
    if "kl" in flags:
        loss["kl_weight"] = args.kl_weight
    return {"loss": loss, "pseudo_label": {"enabled": pseudo, "threshold": args.threshold}}


def methods_of(protocol: str, wanted: list[str] | None) -> list[str]:
    """The methods run in a protocol: the defaults, or those of ``--methods`` that fit it; the
    reference of the paired differences is always run."""
    default = UDA if protocol == "uda" else LABELLED
    if wanted is None:
        return list(default)
    fits = [m for m in wanted if (m == "self_training" or "_pseudo_" in m) == (protocol == "uda")]
    return list(dict.fromkeys([REFERENCE[protocol]] + fits))


def reward_weights_from(y: torch.Tensor) -> list[float]:
    """Inverse-sqrt pixel frequency of the tuning labels, mean 1 over the classes present."""
    counts = torch.bincount(y[y != IGNORE].flatten(), minlength=NUM_CLASSES).double()
    freq = counts / counts.sum()
    w = torch.where(freq > 0, freq.clamp_min(1e-6).rsqrt(), torch.zeros_like(freq))
    return [round(v, 4) for v in (w / w[freq > 0].mean()).tolist()]


# ----------------------------------------------------------------------------- data
def _describe(ds: InMemoryDataset, where: str) -> str:
    return f"{len(ds)} frames of {where} ({ds.names[0]}..{ds.names[-1]})"


def load_data(args) -> dict:
    """Decode every frame set once; returns datasets and a statement of which frames play which role."""
    kw = dict(size=tuple(args.size), cache=False)
    root = Path(args.root)
    sets = {"source": CamVidDataset(root, "train", sequences=list(DAY), **kw),
            "target_tune": CamVidDataset(root, "train", sequences=DUSK, frames=(0, 2 / 3), **kw)}
    frames = {"source": f"day {'+'.join(DAY)} of `{root}/train`",
              "target_tune": f"dusk {DUSK} of `{root}/train`, first 2/3 by frame number"}
    if args.eval_root is None:
        sets["target_eval"] = CamVidDataset(root, "train", sequences=DUSK, frames=(2 / 3, 1), **kw)
        frames["target_eval"] = f"dusk {DUSK} of `{root}/train`, last 1/3 by frame number (held out)"
        sets["source_eval"] = CamVidDataset(root, "val", **kw)
        frames["source_eval"] = f"`{root}/val`"
    else:
        ev = Path(args.eval_root)
        sets["target_eval"] = CamVidDataset(ev, args.eval_split, sequences=DUSK, **kw)
        frames["target_eval"] = f"dusk {DUSK} of `{ev}/{args.eval_split}` (--eval-root)"
        try:
            sets["source_eval"] = CamVidDataset(ev, args.eval_split, exclude_sequences=DUSK, **kw)
            seqs = "+".join(sets["source_eval"].sequences)
            frames["source_eval"] = f"{seqs} of `{ev}/{args.eval_split}` (--eval-root)"
        except ValueError:  # the eval split holds dusk frames only: keep the day val of --root
            sets["source_eval"] = CamVidDataset(root, "val", **kw)
            frames["source_eval"] = f"`{root}/val` (`{ev}/{args.eval_split}` has no other sequence)"
    data = {k: InMemoryDataset.decode(ds) for k, ds in tqdm(list(sets.items()), desc="decode", leave=False)}
    if args.source_eval_every > 1:  # val/ interleaves with train frames: a subsample measures the same fit, faster
        data["source_eval"] = data["source_eval"].subset(slice(None, None, args.source_eval_every))
        frames["source_eval"] += f", every {args.source_eval_every}th frame"
    data["frames"] = {k: _describe(data[k], v) for k, v in frames.items()}
    data["classes"] = list(sets["source"].meta.classes)
    return data


# ----------------------------------------------------------------------------- runs
def run_config(args, work: Path, seed: int, stage: str, steps: int, lr: float, checkpoint: str | None,
               sections: dict, schedule: str = "constant") -> dict:
    """A trainer config: Adam (lr schedule ``schedule``), flips, one evaluation at the end."""
    return {"name": work.name, "stage": stage, "seed": seed, "work_dir": str(work),
            "model": {"name": "unet", "num_classes": NUM_CLASSES, "options": {"width": args.width},
                      "checkpoint": checkpoint},
            "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "schedule": schedule},
            "train": {"iters": steps, "batch_size": args.batch, "eval_every": steps, "checkpoint_every": steps,
                      "log_every": 1, "augment": True, "device": args.device, "progress": False},
            **sections}


def diagnostics(work: Path) -> dict:
    """Mean over the run's logged training lines of every logged loss/diagnostic scalar."""
    loss = load_run(work).loss
    cols = [c for c in loss.columns if c not in NOT_DIAGNOSTICS]
    return {c: float(f"{loss[c].mean():.6g}") for c in cols if loss[c].notna().any()}


def scores(val: dict) -> dict:
    t, s = val["target"], val["source"]
    return {"target_mIoU": round(float(t["mIoU"]), 3), "source_mIoU": round(float(s["mIoU"]), 3),
            "target_IoU": [round(float(v), 2) for v in t["IoU"]], "source_IoU": [round(float(v), 2) for v in s["IoU"]]}


def run_stage(cfg: dict, data: dict, train_set: InMemoryDataset, reuse_key: dict | None = None) -> dict:
    """One trainer run; returns its final scores. A shared stage (pretrain, CE fine-tune) whose
    folder holds a finished run of the same config and data is reused instead of retrained."""
    work = Path(cfg["work_dir"])
    marker = work / "benchmark_stage.json"
    if reuse_key is not None and marker.exists() and (work / "model.safetensors").exists():
        old = json.loads(marker.read_text())
        if old["key"] == reuse_key:
            return old["scores"]
    if work.exists():
        shutil.rmtree(work)  # a stale or unfinished run: start clean (no resume, no appended log)
    val = {"target": data["target_eval"], "source": data["source_eval"]}
    result = train(config_from_dict(cfg), datasets={"train": train_set, "val": val})
    out = scores(result["val"])
    if reuse_key is not None:
        marker.write_text(json.dumps({"key": reuse_key, "scores": out}))
    return out


def run(args) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data(args)
    tune = data["target_tune"]
    weights = reward_weights_from(tune.labels)
    methods = {p: methods_of(p, args.methods) for p in args.protocols}
    budget = {"after_ce": args.extra_steps, "from_source": args.source_steps, "uda": args.uda_steps}
    lrs = {"after_ce": args.extra_lr, "from_source": args.lr, "uda": args.uda_lr}
    out_json = Path(args.out).with_suffix(".json")
    previous: list[dict] = []
    if args.append and out_json.exists():
        old = json.loads(out_json.read_text())
        previous = old["runs"]
        args.prev_runtime_s = float(old.get("runtime_s", 0.0))
        args.prev_commands = old["config"].get("commands", [])
    done = {(r["protocol"], r["method"], r["seed"]) for r in previous}
    runs: list[dict] = list(previous)
    temp_work = args.work is None
    work_root = Path(tempfile.mkdtemp(prefix="camvid_da_")) if temp_work else Path(args.work)
    finetune = "after_ce" in methods  # the CE fine-tuned checkpoint is the start of after_ce only
    per_seed = args.pretrain_steps + finetune * args.finetune_steps + sum(len(m) * budget[p] for p, m in methods.items())
    print(f"data: source {len(data['source'])}, target tune {len(tune)}, target eval {len(data['target_eval'])}, "
          f"source eval {len(data['source_eval'])} frames at {args.size[0]}x{args.size[1]}; {per_seed} steps of "
          f"batch {args.batch} per seed; runs in {work_root}", flush=True)
    bar = tqdm(total=per_seed * len(args.seeds), desc="camvid_da", unit="step", dynamic_ncols=True)

    def record(protocol, method, seed, steps, s, diag=None, t0=None):
        if (protocol, method, seed) in done:
            return
        row = {"protocol": protocol, "method": method, "seed": seed, "steps": steps, **s, "diag": diag or {},
               "time_s": round(time.perf_counter() - t0, 1) if t0 else None}
        runs.append(row)
        tqdm.write(f"seed {seed} {protocol:11s} {method:34s} target {row['target_mIoU']:6.2f} "
                   f"source {row['source_mIoU']:6.2f}" + (f" ({row['time_s']:.0f} s)" if t0 else ""))
        save(args, runs, data, t_start, weights, partial=True)

    try:
        for seed in args.seeds:
            sdir = work_root / f"seed{seed}"
            key = {"root": str(Path(args.root).resolve()), "size": list(args.size), "eval": data["frames"]}
            t0 = time.perf_counter()
            cfg = run_config(args, sdir / "pretrain", seed, "pretrain", args.pretrain_steps, args.pretrain_lr, None,
                             {"loss": {"type": "ce"}}, args.stage_schedule)
            bar.set_postfix_str(f"seed {seed} pretrain")
            s = run_stage(cfg, data, data["source"], {**key, "cfg": cfg})
            bar.update(args.pretrain_steps)
            src = str(sdir / "pretrain" / "model.safetensors")
            for p in ("from_source", "uda"):
                if p in methods:
                    record(p, "source_only", seed, 0, s, t0=t0)
            ce = str(sdir / "finetune" / "model.safetensors")
            if finetune:
                t0 = time.perf_counter()
                cfg = run_config(args, sdir / "finetune", seed + 1, "pretrain", args.finetune_steps, args.lr, src,
                                 {"loss": {"type": "ce"}}, args.stage_schedule)
                bar.set_postfix_str(f"seed {seed} CE fine-tune")
                s = run_stage(cfg, data, tune, {**key, "cfg": cfg})
                bar.update(args.finetune_steps)
                record("after_ce", "ce_finetuned", seed, 0, s, t0=t0)
            for protocol in args.protocols:
                for method in methods[protocol]:
                    steps = budget[protocol]
                    if (protocol, method, seed) in done:
                        bar.update(steps)
                        continue
                    t0 = time.perf_counter()
                    work = sdir / protocol / method
                    cfg = run_config(args, work, seed + 2, "tune", steps, lrs[protocol],
                                     ce if protocol == "after_ce" else src, method_loss(method, args, weights))
                    bar.set_postfix_str(f"seed {seed} {protocol} {method}")
                    s = run_stage(cfg, data, tune)
                    diag = diagnostics(work)
                    if not args.keep_weights:
                        shutil.rmtree(work / "checkpoints", ignore_errors=True)
                        (work / "model.safetensors").unlink(missing_ok=True)
                    bar.update(steps)
                    record(protocol, method, seed, steps, s, diag, t0=t0)
    finally:
        bar.close()
        if temp_work:
            shutil.rmtree(work_root, ignore_errors=True)
    result = save(args, runs, data, t_start, weights, partial=False)
    print(f"total runtime {result['runtime_s']:.0f} s on {torch.get_num_threads()} CPU thread(s) "
          f"({platform.processor() or platform.machine()})", flush=True)
    return result


# ----------------------------------------------------------------------------- statistics
def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: list[dict]) -> list[dict]:
    """Per (protocol, method): mean ± std over seeds, the seed-paired difference to the
    protocol's reference (``ce``; ``self_training`` in uda), and the diagnostics' means."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        groups.setdefault((r["protocol"], r["method"]), {})[r["seed"]] = r
    rows = []
    for (p, m), by_seed in groups.items():
        rs = list(by_seed.values())
        row = {"protocol": p, "method": m, "n": len(rs)}
        for side in ("target", "source"):
            row[f"{side}_mean"], row[f"{side}_std"] = _mean_std([r[f"{side}_mIoU"] for r in rs])
        ref = groups.get((p, REFERENCE[p]), {})
        paired = sorted(set(by_seed) & set(ref))
        if paired and m != REFERENCE[p]:
            row["reference"], row["paired_seeds"] = REFERENCE[p], paired
            for side in ("target", "source"):
                d = [by_seed[s][f"{side}_mIoU"] - ref[s][f"{side}_mIoU"] for s in paired]
                row[f"{side}_diff_mean"], row[f"{side}_diff_std"] = _mean_std(d)
                row[f"{side}_diffs"] = [round(x, 3) for x in d]
        keys = sorted({k for r in rs for k in r.get("diag", {})})
        row["diag"] = {k: float(np.mean([r["diag"][k] for r in rs if k in r.get("diag", {})])) for k in keys}
        rows.append(row)
    return rows


def _pm(mean: float, std: float, sign: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}" if sign else f"{mean:.2f} ± {std:.2f}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    fr = cfg["frames"]
    lines = ["# CamVid day -> dusk benchmark", "",
             "Commands: " + "; then ".join(f"`{c}`" for c in cfg["commands"]) + "  ",
             f"Total runtime: {result['runtime_s']:.0f} s ({cfg['threads']} CPU thread(s) per process, device "
             f"{cfg['device']}" + (f"; the sum over {cfg['processes']} processes run side by side, seeds split "
                                   "between them" if cfg.get("processes", 1) > 1 else "") + "). "
             f"Seeds: {cfg['seeds']}." + ("" if result["complete"] else " **Partial results (run not finished).**"), "",
             "Frames:", "",
             f"- source training: {fr['source']}",
             f"- target tuning: {fr['target_tune']}",
             f"- **target evaluation (scored): {fr['target_eval']}**",
             f"- source evaluation (scored): {fr['source_eval']}", "",
             f"Frames at {cfg['size'][0]}x{cfg['size'][1]}; U-Net width {cfg['width']}; every run is a "
             f"`segreward.engine.train` run (Adam, random flips, one evaluation at its end; lr schedule "
             f"{cfg.get('stage_schedule', 'constant')} for pretraining and CE fine-tuning, constant for the methods).",
             f"Steps (batch {cfg['batch']}): pretrain {cfg['pretrain_steps']} (lr {cfg['pretrain_lr']}), "
             f"CE fine-tune {cfg['finetune_steps']} (lr {cfg['lr']}), after_ce {cfg['extra_steps']} "
             f"(lr {cfg['extra_lr']}), from_source {cfg['source_steps']} (lr {cfg['lr']}), uda {cfg['uda_steps']} "
             f"(lr {cfg['uda_lr']}, pseudo-label threshold {cfg['threshold']}). `_ce` = CE anchor of weight "
             f"{cfg['ce_anchor']}; local methods: loss.estimator=local, K=1 (running momentum {cfg['momentum']}); "
             f"sampled REINFORCE: K={cfg['k']}, temperature {cfg['temperature']}.", "",
             "mIoU in percent, mean ± std over seeds; Δ = seed-paired difference to the protocol's reference "
             "(`ce`, in uda `self_training`), mean ± std over the seeds both have. Diagnostics: mean over the "
             "logged steps of each run, then over seeds.", ""]
    classes = cfg["classes"]
    for p in PROTOCOLS:
        rows = [r for r in result["summary"] if r["protocol"] == p]
        if not rows:
            continue
        ref = REFERENCE[p]
        lines += [f"## {p}", "", f"| method | n | target mIoU | Δ target vs {ref} | source mIoU | Δ source vs {ref} |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: -r["target_mean"]):
            dt = _pm(r["target_diff_mean"], r["target_diff_std"], True) if "target_diff_mean" in r else ""
            ds = _pm(r["source_diff_mean"], r["source_diff_std"], True) if "source_diff_mean" in r else ""
            name = f"**{r['method']}**" if r["method"] == ref else r["method"]
            lines.append(f"| {name} | {r['n']} | {_pm(r['target_mean'], r['target_std'])} | {dt} | "
                         f"{_pm(r['source_mean'], r['source_std'])} | {ds} |")
        trained = [r for r in rows if r["method"] not in STARTS]
        named = [m for m in (ref, "ce", "lovasz") if any(r["method"] == m for r in trained)]
        others = sorted((r for r in trained if r["method"] not in named), key=lambda r: -r["target_mean"])
        show = list(dict.fromkeys(named + [r["method"] for r in others[:1]]))
        if show:
            best = f"; best other method: {others[0]['method']}" if others else ""
            lines += ["", f"Per-class target IoU (mean over seeds){best}:",
                      "", "| method | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
            for m in show:
                ious = np.mean([r["target_IoU"] for r in result["runs"] if r["protocol"] == p and r["method"] == m], 0)
                lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in ious) + " |")
        keys = sorted({k for r in trained for k in r["diag"] if not k.startswith("loss")},
                      key=lambda k: (DIAG_ORDER.index(k) if k in DIAG_ORDER else len(DIAG_ORDER), k))
        if keys:
            lines += ["", "Diagnostics (mean over logged steps and seeds):", "",
                      "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for r in (r for r in trained if any(k in r["diag"] for k in keys)):
                lines.append(f"| {r['method']} | " + " | ".join(f"{r['diag'][k]:.4g}" if k in r["diag"] else ""
                                                               for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def save(args, runs, data, t_start, weights, partial: bool) -> dict:
    skip = ("out", "prev_runtime_s", "prev_commands", "work", "argv")
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    cfg["command"] = "python benchmarks/camvid_da.py " + " ".join(args.argv)
    cfg["commands"] = list(getattr(args, "prev_commands", [])) + [cfg["command"]]
    cfg["classes"] = data["classes"]
    cfg["reward_class_weights"] = weights
    cfg["frames"] = data["frames"]
    result = {"runs": runs, "summary": summarize(runs), "config": cfg,
              "runtime_s": round(time.perf_counter() - t_start + getattr(args, "prev_runtime_s", 0.0), 1),
              "complete": not partial}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))  # an interrupted write never leaves half a file
    return result


def merge(paths: list[str], out: str) -> dict:
    """Combine result files of runs that differ only in their seeds (e.g. seeds split over
    parallel processes) into one result: runs pooled, commands listed, runtimes added up."""
    results = [json.loads(Path(p).with_suffix(".json").read_text()) for p in paths]
    ignore = {"seeds", "command", "commands", "methods", "protocols", "append", "threads", "device"}
    base = {k: v for k, v in results[0]["config"].items() if k not in ignore}
    runs: dict[tuple, dict] = {}
    for path, res in zip(paths, results):
        other = {k: v for k, v in res["config"].items() if k not in ignore}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise SystemExit(f"{path}: settings differ from {paths[0]} in {diff}; only seeds may differ")
        for r in res["runs"]:
            runs.setdefault((r["protocol"], r["method"], r["seed"]), r)
    cfg = dict(results[0]["config"])
    cfg["seeds"] = sorted({r["seed"] for r in runs.values()})
    cfg["commands"] = [c for res in results for c in res["config"]["commands"]]
    cfg["processes"] = len(results)
    result = {"runs": list(runs.values()), "summary": summarize(list(runs.values())), "config": cfg,
              "runtime_s": round(sum(r["runtime_s"] for r in results), 1),
              "complete": all(r["complete"] for r in results)}
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = target.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target.with_suffix(suffix))
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="../shared/data/camvid", help="CamVid folder (train/, trainannot/, val/, ...)")
    p.add_argument("--eval-root", default=None, help="score on this CamVid-layout folder instead (tuning unchanged)")
    p.add_argument("--eval-split", default="test", help="split of --eval-root to score")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"subset of methods (default: {' '.join(LABELLED)}; uda: {' '.join(UDA)}); "
                        "the reference (ce / self_training) always runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", nargs=2, type=int, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--width", type=int, default=24, help="U-Net width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--stage-schedule", default="constant", choices=["constant", "poly", "cosine"],
                   help="lr schedule of the pretrain and CE fine-tune stages (method runs: constant lr)")
    p.add_argument("--lr", type=float, default=1e-3, help="CE fine-tuning and from_source lr")
    p.add_argument("--steps", "--extra-steps", dest="extra_steps", type=int, default=200,
                   help="after_ce budget of every method (steps)")
    p.add_argument("--extra-lr", type=float, default=3e-4)
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--uda-steps", type=int, default=200)
    p.add_argument("--uda-lr", type=float, default=3e-4)
    p.add_argument("--threshold", type=float, default=0.8, help="pseudo-label confidence threshold")
    p.add_argument("--ce-anchor", type=float, default=1.0, help="CE weight of the _ce methods (loss.ce_weight)")
    p.add_argument("--k", type=int, default=4, help="samples per image of the sampled reinforce_* methods")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block", type=int, default=16, help="coherent sampler region size (pixels)")
    p.add_argument("--momentum", type=float, default=0.9, help="discount of scope running (loss.momentum)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="loss.kl_weight of the _kl methods")
    p.add_argument("--source-eval-every", type=int, default=4, help="score every N-th source eval frame (1: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded shared machine)")
    p.add_argument("--device", default="auto", help="trainer device: auto | cpu | cuda")
    p.add_argument("--work", default=None, help="folder for the run directories (default: a temporary one, removed "
                                                "at the end); a kept folder lets --append reuse the pretrain/fine-tune")
    p.add_argument("--keep-weights", action="store_true", help="keep every method run's weights and checkpoint")
    p.add_argument("--append", action="store_true", help="add runs to the existing --out JSON, skipping those there")
    p.add_argument("--out", default="results/camvid_da", help="output path without suffix (.json and .md)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULT",
                   help="only combine these result files (runs that differ in seeds) into --out; trains nothing")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for m in args.methods or []:  # method names are checked before any data is read
        try:
            method_loss(m, args, [])
        except ValueError as e:
            p.error(f"{e}; e.g. {', '.join(LABELLED + UDA)}, reinforce_<sampler>_<baseline>[_ce], "
                    f"local_[pseudo_]<scope>[_ce][_kl]")
    return args


if __name__ == "__main__":
    _args = parse()
    if _args.merge:
        merge(_args.merge, _args.out)
    else:
        run(_args)
