"""CamVid day -> dusk: each method at its best learning rate, with and without calibration.

Every training run goes through the trainer.

Data. Source = day sequences 0006R0 + 0016E5 of ``train/``; day val = ``val/`` (0016E5). The dusk
frames 0001TP of ``train/`` play three roles, split by frame number (neighbouring frames would
leak otherwise): the first 2/3 *tune* (the labels every method trains and calibrates on), the
last 1/3 is the *selection* split, used only to choose each method's lr. ``--eval-root DIR`` (a
CamVid-layout folder with a ``--eval-split``, default ``test``) is where the chosen settings are
scored: its 0001TP frames are the target evaluation, its other frames the source evaluation
(``--root``'s day val when it has none). Without it the scored target numbers *are* the
selection split's, chosen on that split: optimistic, and the outputs say so. Frames are
downscaled (``--size``) and decoded once per process into :class:`InMemoryDataset` tensors.

Protocol, per seed. CE pretraining on the source (``--pretrain-steps``) -> checkpoint ``src``
(row ``source_only``); CE fine-tuning of ``src`` on the tune labels (``--finetune-steps``) ->
checkpoint ``ce`` (row ``ce_finetuned``). Then each method at each lr of its protocol's grid
(``--lrs``, ``--source-lrs``, ``--uda-lrs``) from the same checkpoint with the same budget
(steps x batch), the same batch order and the same augmentation (flips drawn per sample from
(seed, epoch, index), :meth:`InMemoryDataset.seeded`, so a loss that draws random numbers does
not change the batches):

* ``after_ce``    from ``ce``, ``--steps`` more steps of each method on the tune labels;
* ``from_source`` from ``src``, ``--source-steps`` steps of each method on the tune labels;
* ``uda``         from ``src``, ``--uda-steps`` steps without target labels, against the
                  pseudo-labels of the frozen ``src`` model (``pseudo_label.enabled``).

Every run (and each start checkpoint) also gets a ``<method>+cal`` row: class offsets fitted on
the tune frames (``calibrate_model``, reward mIoU, exact), folded into the classifier's bias, the
folded model scored on the same sets. No training, seconds per run.

Methods (config of the trainer in brackets):

* ``ce`` [loss.type=ce], ``lovasz`` [loss.type=lovasz], ``ce_lovasz`` [loss.type=lovasz,
  loss.ce_weight=1: Lovász + CE 1:1], ``reward_weighted_ce``;
* ``reinforce_<sampler>_<baseline>`` [loss.type=reinforce, sampled estimator, K=``--k``];
* ``local_<scope>`` [loss.type=reinforce, loss.estimator=local, loss.scope=image|batch|running, loss.k=1];
* uda: ``self_training`` (CE on the pseudo-labels), ``local_pseudo_<scope>``, ``reinforce_pseudo_<sampler>_<baseline>``;
* suffixes: ``_ce`` CE anchor of weight ``--ce-anchor`` [loss.ce_weight], ``_kl`` KL to the
  starting model [loss.kl_weight=``--kl-weight``], ``_wmiou`` class-weighted mIoU reward
  (inverse-sqrt pixel frequency of the tuning labels), ``_norm`` normalised advantages.

Statistics. Each method's lr (``+cal`` pipelines separately) is the grid point with the highest
mean selection mIoU over the seeds that ran the whole grid (not chosen per seed). At the chosen
lrs: mean ± std over seeds, the seed-paired differences to ``ce`` and ``lovasz`` (and to
``self_training`` in uda), per-class IoU, the lr curves, the logged diagnostics' means.

    python benchmarks/camvid_da.py --root ../shared/data/camvid --seeds 0 1 2 3 4 --protocols after_ce \\
        --out results/camvid_verdict --plot docs/img/camvid_lr_curves.png

writes ``results/camvid_verdict.json`` and ``.md``, rewritten after every run (``--append``
resumes; ``--merge`` pools processes that ran different seeds).
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
import torch.nn as nn
from tqdm.auto import tqdm

from segreward.calibrate.folding import fold_offsets
from segreward.data.formats import CamVidDataset
from segreward.data.memory import InMemoryDataset
from segreward.engine import config_from_dict, train
from segreward.engine.calibration import calibrate_model
from segreward.engine.trainer import evaluate
from segreward.models import build_model, load_weights
from segreward.runlog import load_run

NUM_CLASSES, IGNORE = 11, 255
DAY, DUSK = ("0006R0", "0016E5"), "0001TP"
PROTOCOLS = ("after_ce", "from_source", "uda")
SCOPES = ("image", "batch", "running")
LABELLED = ["ce", "lovasz", "ce_lovasz", "local_batch", "local_batch_ce"]
UDA = ["self_training", "local_pseudo_batch"]
REFERENCE = {"after_ce": "ce", "from_source": "ce", "uda": "self_training"}
STARTS = ("source_only", "ce_finetuned")
CAL = "+cal"
LRS = [1e-4, 3e-4, 1e-3, 3e-3]
FLAGS = ("ce", "kl", "wmiou", "norm")
# Logged scalars that describe the run's bookkeeping, not the loss: left out of the diagnostics.
NOT_DIAGNOSTICS = {"step", "iter", "lr", "data_time", "time", "memory"}
DIAG_ORDER = ("reward_mean", "reward_std", "adv_std", "greedy_reward", "credit_abs", "credit_label_pos", "entropy",
              "kl", "pseudo_fraction", "cal_tune_before", "cal_tune_after")


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
    elif base == "ce_lovasz":
        loss = {"type": "lovasz", "ce_weight": 1.0}
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
            "target_tune": CamVidDataset(root, "train", sequences=DUSK, frames=(0, 2 / 3), **kw),
            "target_select": CamVidDataset(root, "train", sequences=DUSK, frames=(2 / 3, 1), **kw)}
    frames = {"source": f"day {'+'.join(DAY)} of `{root}/train`",
              "target_tune": f"dusk {DUSK} of `{root}/train`, first 2/3 by frame number",
              "target_select": f"dusk {DUSK} of `{root}/train`, last 1/3 by frame number (held out from tuning)"}
    if args.eval_root is None:
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
    data["optimistic"] = args.eval_root is None
    if data["optimistic"]:  # no test split: the scored numbers are the selection split's
        data["target_eval"] = data["target_select"]
        data["frames"]["target_eval"] = ("the selection split (no --eval-root): chosen on this split, "
                                         "optimistic")
    data["classes"] = list(sets["source"].meta.classes)
    return data


def eval_sets(data: dict) -> dict:
    """The sets every run is scored on: ``target`` (scored), ``source``, and ``select`` when it differs."""
    sets = {"target": data["target_eval"], "source": data["source_eval"]}
    if not data["optimistic"]:
        sets["select"] = data["target_select"]
    return sets


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
    """A row's scores from ``{set name: evaluate(...)}``: the scored target, the selection split
    (the target itself when there is no separate evaluation set) and the source."""
    t, s = val["target"], val["source"]
    sel = val.get("select", t)
    return {"target_mIoU": round(float(t["mIoU"]), 3), "select_mIoU": round(float(sel["mIoU"]), 3),
            "source_mIoU": round(float(s["mIoU"]), 3),
            "target_IoU": [round(float(v), 2) for v in t["IoU"]], "source_IoU": [round(float(v), 2) for v in s["IoU"]]}


def _device(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def load_model(args, path: str | Path) -> nn.Module:
    model = build_model("unet", NUM_CLASSES, width=args.width)
    load_weights(model, path)
    return model.to(_device(args))


def score_model(model: nn.Module, data: dict, args) -> dict:
    val = {k: evaluate(model, ds, NUM_CLASSES, IGNORE, device=_device(args)) for k, ds in eval_sets(data).items()}
    return scores(val)


def calibrated(args, weights: str | Path, data: dict) -> tuple[dict, dict]:
    """Scores of the model at ``weights`` after calibration on the tune frames (offsets folded into
    its classifier's bias), and the calibration's in-sample mIoU before/after and offsets."""
    model = load_model(args, weights)
    cal = calibrate_model(model, data["target_tune"], reward="miou", mode="exact", kfold=None, progress=False,
                          device=_device(args))
    fold_offsets(model, cal.offsets)
    info = {"cal_tune_before": round(100 * cal.reward_before, 3), "cal_tune_after": round(100 * cal.reward_after, 3),
            "offsets": [round(float(v), 4) for v in cal.offsets]}
    return score_model(model, data, args), info


def run_stage(cfg: dict, data: dict, train_set: InMemoryDataset, args, reuse_key: dict | None = None) -> dict:
    """One trainer run; returns its final scores. A shared stage (pretrain, CE fine-tune) whose
    folder holds a finished run of the same config and training data is reused instead of
    retrained (its weights are scored again, so the evaluation sets may change)."""
    work = Path(cfg["work_dir"])
    marker = work / "benchmark_stage.json"
    if reuse_key is not None and marker.exists() and (work / "model.safetensors").exists():
        old = json.loads(marker.read_text())["key"]
        if {k: old.get(k) for k in reuse_key} == reuse_key:
            return score_model(load_model(args, work / "model.safetensors"), data, args)
    if work.exists():
        shutil.rmtree(work)  # a stale or unfinished run: start clean (no resume, no appended log)
    result = train(config_from_dict(cfg), datasets={"train": train_set, "val": eval_sets(data)})
    out = scores(result["val"])
    if reuse_key is not None:
        marker.write_text(json.dumps({"key": reuse_key}))
    return out


def chosen_lrs_from(path: str) -> dict[tuple[str, str], float]:
    """``(protocol, method) -> chosen lr`` of an earlier result file (``--lrs-from``)."""
    res = json.loads(Path(path).with_suffix(".json").read_text())
    return {(r["protocol"], r["method"]): r["lr"] for r in res["summary"]["rows"] if r["lr"] is not None}


def lr_plan(args, protocol: str, method: str, chosen: dict | None) -> list[float]:
    """The lrs a method runs at: its protocol's grid, or (``--lrs-from``) the lrs chosen there for
    the method and for its ``+cal`` pipeline."""
    grid = {"after_ce": args.lrs, "from_source": args.source_lrs or args.lrs, "uda": args.uda_lrs or args.lrs}[protocol]
    if chosen is None:
        return list(grid)
    picked = [chosen.get((protocol, method)), chosen.get((protocol, method + CAL))]
    if picked[0] is None:
        raise SystemExit(f"--lrs-from {args.lrs_from}: no chosen lr for {protocol} {method}; run its grid first")
    return list(dict.fromkeys(v for v in picked if v is not None))


def run(args) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data(args)
    tune = data["target_tune"]
    weights = reward_weights_from(tune.labels)
    methods = {p: methods_of(p, args.methods) for p in args.protocols}
    budget = {"after_ce": args.extra_steps, "from_source": args.source_steps, "uda": args.uda_steps}
    chosen = chosen_lrs_from(args.lrs_from) if args.lrs_from else None
    plan = {(p, m): lr_plan(args, p, m, chosen) for p in methods for m in methods[p]}
    out_json = Path(args.out).with_suffix(".json")
    previous: list[dict] = []
    if args.append and out_json.exists():
        old = json.loads(out_json.read_text())
        previous = old["runs"]
        args.prev_runtime_s = float(old.get("runtime_s", 0.0))
        args.prev_commands = old["config"].get("commands", [])
    done = {(r["protocol"], r["method"], r["seed"], r["lr"]) for r in previous}
    runs: list[dict] = list(previous)
    temp_work = args.work is None
    work_root = Path(tempfile.mkdtemp(prefix="camvid_da_")) if temp_work else Path(args.work)
    finetune = "after_ce" in methods  # the CE fine-tuned checkpoint is the start of after_ce only
    per_seed = args.pretrain_steps + finetune * args.finetune_steps + sum(len(v) * budget[p]
                                                                          for (p, _), v in plan.items())
    print(f"data: source {len(data['source'])}, target tune {len(tune)}, selection {len(data['target_select'])}, "
          f"target eval {len(data['target_eval'])}{' (= selection)' if data['optimistic'] else ''}, source eval "
          f"{len(data['source_eval'])} frames at {args.size[0]}x{args.size[1]}; {per_seed} steps of batch "
          f"{args.batch} per seed; runs in {work_root}", flush=True)
    bar = tqdm(total=per_seed * len(args.seeds), desc="camvid_da", unit="step", dynamic_ncols=True)

    def record(protocol, method, seed, lr, steps, s, diag=None, t0=None):
        if (protocol, method, seed, lr) in done:
            return
        row = {"protocol": protocol, "method": method, "seed": seed, "lr": lr, "steps": steps, **s,
               "diag": diag or {}, "time_s": round(time.perf_counter() - t0, 1) if t0 else None}
        runs.append(row)
        done.add((protocol, method, seed, lr))
        tqdm.write(f"seed {seed} {protocol:11s} {method:22s} lr {lr if lr is not None else '-':<7} target "
                   f"{row['target_mIoU']:6.2f} select {row['select_mIoU']:6.2f} source {row['source_mIoU']:6.2f}"
                   + (f" ({row['time_s']:.0f} s)" if t0 else ""))
        save(args, runs, data, t_start, weights, partial=True)

    def record_with_cal(protocol, method, seed, lr, steps, s, weights_path, diag=None, t0=None):
        record(protocol, method, seed, lr, steps, s, diag, t0)
        if (protocol, method + CAL, seed, lr) not in done:
            t1 = time.perf_counter()
            cs, info = calibrated(args, weights_path, data)
            record(protocol, method + CAL, seed, lr, steps, cs, info, t1)

    try:
        for seed in args.seeds:
            sdir = work_root / f"seed{seed}"
            key = {"root": str(Path(args.root).resolve()), "size": list(args.size)}
            t0 = time.perf_counter()
            cfg = run_config(args, sdir / "pretrain", seed, "pretrain", args.pretrain_steps, args.pretrain_lr, None,
                             {"loss": {"type": "ce"}}, args.stage_schedule)
            bar.set_postfix_str(f"seed {seed} pretrain")
            s = run_stage(cfg, data, data["source"], args, {**key, "cfg": cfg})
            bar.update(args.pretrain_steps)
            src = str(sdir / "pretrain" / "model.safetensors")
            for p in ("from_source", "uda"):
                if p in methods:
                    record_with_cal(p, "source_only", seed, None, 0, s, src, t0=t0)
            ce = str(sdir / "finetune" / "model.safetensors")
            if finetune:
                t0 = time.perf_counter()
                cfg = run_config(args, sdir / "finetune", seed + 1, "pretrain", args.finetune_steps, args.lr, src,
                                 {"loss": {"type": "ce"}}, args.stage_schedule)
                bar.set_postfix_str(f"seed {seed} CE fine-tune")
                s = run_stage(cfg, data, tune, args, {**key, "cfg": cfg})
                bar.update(args.finetune_steps)
                record_with_cal("after_ce", "ce_finetuned", seed, None, 0, s, ce, t0=t0)
            # identical batches and flips for every method and lr of this seed
            seeded_tune = tune.seeded(seed + 2)
            for protocol in args.protocols:
                steps = budget[protocol]
                lrs = list(dict.fromkeys(lr for m in methods[protocol] for lr in plan[(protocol, m)]))
                # --order lr: every method at one lr before the next lr (a stopped run has whole lr
                # columns); --order method: a method's whole lr grid before the next method
                todo = ([(m, lr) for lr in lrs for m in methods[protocol] if lr in plan[(protocol, m)]]
                        if args.order == "lr" else [(m, lr) for m in methods[protocol] for lr in plan[(protocol, m)]])
                for method, lr in todo:
                    if {(protocol, method, seed, lr), (protocol, method + CAL, seed, lr)} <= done:
                        bar.update(steps)
                        continue
                    t0 = time.perf_counter()
                    work = sdir / protocol / method / f"lr{lr:g}"
                    cfg = run_config(args, work, seed + 2, "tune", steps, lr,
                                     ce if protocol == "after_ce" else src, method_loss(method, args, weights))
                    bar.set_postfix_str(f"seed {seed} {protocol} {method} lr {lr:g}")
                    s = run_stage(cfg, data, seeded_tune, args)
                    diag = diagnostics(work)
                    record_with_cal(protocol, method, seed, lr, steps, s, work / "model.safetensors", diag, t0)
                    if not args.keep_weights:
                        shutil.rmtree(work / "checkpoints", ignore_errors=True)
                        (work / "model.safetensors").unlink(missing_ok=True)
                    bar.update(steps)
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


def _lr_key(lr) -> float:
    return -1.0 if lr is None else float(lr)


def reward_pipeline(method: str) -> bool:
    """Whether a pipeline optimises the task reward: calibration, reward tuning, or both."""
    return method.endswith(CAL) or method.startswith(("local_", "reinforce_"))


def choose_lr(cells: dict) -> tuple[float | None, list[int]]:
    """``cells``: ``{lr: {seed: row}}`` of one method. The lr with the highest mean selection mIoU
    over the seeds that ran every lr (all seeds of each lr when none did); ties: the smaller lr."""
    common = sorted(set.intersection(*(set(c) for c in cells.values())))

    def mean_select(lr):
        seeds = common or sorted(cells[lr])
        return float(np.mean([cells[lr][s]["select_mIoU"] for s in seeds]))

    best = max(sorted(cells, key=_lr_key), key=mean_select)  # max keeps the first of equal scores
    return best, common


def summarize(runs: list[dict]) -> dict:
    """``cells``: per (protocol, method, lr) mean ± std of each split over seeds (the lr curves);
    ``rows``: per (protocol, method) at its chosen lr, with seed-paired differences to ``ce``,
    ``lovasz`` (and the protocol's reference) at *their* chosen lrs and the diagnostics' means;
    ``goal``: the issue's criterion for after_ce."""
    groups: dict[tuple, dict] = {}
    for r in runs:
        groups.setdefault((r["protocol"], r["method"]), {}).setdefault(r.get("lr"), {})[r["seed"]] = r
    cells = []
    for (p, m), by_lr in groups.items():
        for lr, by_seed in sorted(by_lr.items(), key=lambda kv: _lr_key(kv[0])):
            cell = {"protocol": p, "method": m, "lr": lr, "n": len(by_seed), "seeds": sorted(by_seed)}
            for side in ("target", "select", "source"):
                cell[f"{side}_mean"], cell[f"{side}_std"] = _mean_std([r[f"{side}_mIoU"] for r in by_seed.values()])
            cells.append(cell)
    best = {pm: choose_lr(by_lr) for pm, by_lr in groups.items()}
    rows = []
    for (p, m), by_lr in groups.items():
        lr, lr_seeds = best[(p, m)]
        by_seed = by_lr[lr]
        rs = list(by_seed.values())
        row = {"protocol": p, "method": m, "lr": lr, "lr_grid": sorted((v for v in by_lr if v is not None)),
               "lr_chosen_on_seeds": lr_seeds, "n": len(rs), "seeds": sorted(by_seed)}
        for side in ("target", "select", "source"):
            row[f"{side}_mean"], row[f"{side}_std"] = _mean_std([r[f"{side}_mIoU"] for r in rs])
        row["target_IoU"] = [round(float(v), 2) for v in np.mean([r["target_IoU"] for r in rs], 0)]
        row["vs"] = {}
        for ref in dict.fromkeys([REFERENCE[p], "ce", "lovasz"]):
            if ref == m or (p, ref) not in groups:
                continue
            ref_rows = groups[(p, ref)][best[(p, ref)][0]]
            paired = sorted(set(by_seed) & set(ref_rows))
            if not paired:
                continue
            d = {"ref_lr": best[(p, ref)][0], "seeds": paired}
            for side in ("target", "source"):
                diffs = [by_seed[s][f"{side}_mIoU"] - ref_rows[s][f"{side}_mIoU"] for s in paired]
                d[f"{side}_diff_mean"], d[f"{side}_diff_std"] = _mean_std(diffs)
                d[f"{side}_diffs"] = [round(x, 3) for x in diffs]
            row["vs"][ref] = d
        keys = sorted({k for r in rs for k in r.get("diag", {}) if k != "offsets"})
        row["diag"] = {k: float(np.mean([r["diag"][k] for r in rs if k in r.get("diag", {})])) for k in keys}
        rows.append(row)
    return {"cells": cells, "rows": rows, "goal": goal(rows)}


def goal(rows: list[dict], protocol: str = "after_ce", over_ce: float = 2.0, over_lovasz: float = 0.5,
         min_seeds: int = 5) -> dict | None:
    """Issue 16's criterion: the best reward-optimising pipeline (by mean selection mIoU) beats the
    best-lr extra CE by >= ``over_ce`` target mIoU (mean of the seed-paired differences, n >=
    ``min_seeds``, larger than their std) and the best-lr Lovász by >= ``over_lovasz``."""
    cands = [r for r in rows if r["protocol"] == protocol and reward_pipeline(r["method"])]
    if not cands:
        return None
    best = max(cands, key=lambda r: r["select_mean"])
    ce, lz = best["vs"].get("ce"), best["vs"].get("lovasz")
    ok_ce = bool(ce and len(ce["seeds"]) >= min_seeds and ce["target_diff_mean"] >= over_ce
                 and ce["target_diff_mean"] > ce["target_diff_std"])
    ok_lz = bool(lz and lz["target_diff_mean"] >= over_lovasz)
    return {"protocol": protocol, "best": best["method"], "lr": best["lr"],
            "vs_ce": ce and [ce["target_diff_mean"], ce["target_diff_std"], len(ce["seeds"])],
            "vs_lovasz": lz and [lz["target_diff_mean"], lz["target_diff_std"], len(lz["seeds"])],
            "met_vs_ce": ok_ce, "met_vs_lovasz": ok_lz, "met": ok_ce and ok_lz,
            "criterion": f"Δ vs ce >= {over_ce} (n >= {min_seeds}, mean > std) and Δ vs lovasz >= {over_lovasz}"}


def _pm(mean: float, std: float, sign: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}" if sign else f"{mean:.2f} ± {std:.2f}"


def _lr(lr) -> str:
    return "—" if lr is None else f"{lr:g}"


def _order(method: str) -> tuple:
    base = method[:-len(CAL)] if method.endswith(CAL) else method
    known = list(STARTS) + LABELLED + UDA
    return (known.index(base) if base in known else len(known), base, method.endswith(CAL))


def markdown(result: dict) -> str:
    cfg = result["config"]
    fr = cfg["frames"]
    summ = result["summary"]
    optimistic = cfg.get("eval_root") is None
    ran = {r["protocol"] for r in summ["rows"]}
    scored = "selection split, chosen on it: optimistic" if optimistic else "evaluation set"
    lines = ["# CamVid day -> dusk: each method at its best lr, with and without calibration", "",
             "Commands: " + "; then ".join(f"`{c}`" for c in cfg["commands"]) + "  ",
             f"Total runtime: {result['runtime_s']:.0f} s ({cfg['threads']} CPU thread(s) per process, device "
             f"{cfg['device']}" + (f"; the sum over {cfg['processes']} processes run side by side, seeds split "
                                   "between them" if cfg.get("processes", 1) > 1 else "") + "). "
             f"Seeds: {cfg['seeds']}." + ("" if result["complete"] else " **Partial results (run not finished).**"),
             "", "Frames:", "",
             f"- source training: {fr['source']}",
             f"- target tuning (training and calibration labels): {fr['target_tune']}",
             f"- selection (chooses each method's lr): {fr['target_select']}",
             f"- **target evaluation (scored): {fr['target_eval']}**",
             f"- source evaluation (scored): {fr['source_eval']}", ""]
    if optimistic:
        lines += ["**No test split here: the target numbers below are the selection split's, on which each "
                  "method's lr was chosen (optimistic for every row alike; the calibration offsets are fitted on "
                  "the tune frames only).**", ""]
    lines += [f"Frames at {cfg['size'][0]}x{cfg['size'][1]}; U-Net width {cfg['width']}; every training run is a "
              f"`segreward.engine.train` run (Adam, constant lr, random flips drawn per sample from (seed, epoch, "
              f"frame) so every method and lr of a seed sees the same batches; one evaluation at its end).",
              f"Steps (batch {cfg['batch']}): pretrain {cfg['pretrain_steps']} (lr {cfg['pretrain_lr']}), "
              f"CE fine-tune {cfg['finetune_steps']} (lr {cfg['lr']}), then per method run: "
              + ", ".join(f"{p} {cfg[k]}" for p, k in (("after_ce", "extra_steps"), ("from_source", "source_steps"),
                                                       ("uda", "uda_steps")) if p in ran)
              + (f" (pseudo-label threshold {cfg['threshold']})" if "uda" in ran else "") + "; lr grids: "
              + ", ".join(f"{p} {sorted({c['lr'] for c in summ['cells'] if c['protocol'] == p and c['lr']})}"
                          for p in PROTOCOLS if p in ran) + ". `ce_lovasz` = Lovász + CE 1:1; `_ce` = CE anchor of weight "
              f"{cfg['ce_anchor']}; local methods: loss.estimator=local, K=1. `+cal` = the run's model with class "
              "offsets fitted on the tune frames (exact mIoU search) folded into its bias: no training.", "",
              "mIoU in percent, mean ± std over seeds. Each method's (and each `+cal` pipeline's) lr is the grid "
              "point with the best mean selection mIoU over the seeds that ran the whole grid. Δ = seed-paired "
              "difference to `ce` / `lovasz` at *their* chosen lrs, mean ± std over the seeds both have.", ""]
    g = summ.get("goal")
    if g:
        def fmt(v):
            return "n/a" if not v else f"{v[0]:+.2f} ± {v[1]:.2f} (n={v[2]})"
        lines += ["## Goal", "",
                  f"Criterion (after_ce): {g['criterion']}. Best reward-optimising pipeline by mean selection mIoU: "
                  f"**{g['best']}** (lr {_lr(g['lr'])}): Δ vs ce {fmt(g['vs_ce'])}, Δ vs lovasz "
                  f"{fmt(g['vs_lovasz'])} -> **{'met' if g['met'] else 'not met'}** (vs ce: "
                  f"{'yes' if g['met_vs_ce'] else 'no'}, vs lovasz: {'yes' if g['met_vs_lovasz'] else 'no'}).", ""]
    classes = cfg["classes"]
    for p in PROTOCOLS:
        rows = sorted((r for r in summ["rows"] if r["protocol"] == p), key=lambda r: -r["target_mean"])
        if not rows:
            continue
        refs = [x for x in dict.fromkeys([REFERENCE[p], "ce", "lovasz"]) if any(r["method"] == x for r in rows)]
        lines += [f"## {p}", "", f"Target mIoU = {scored}.", "",
                  "| method | lr | n | target mIoU | " + " | ".join(f"Δ target vs {x}" for x in refs)
                  + " | source mIoU |", "| --- " * (4 + len(refs) + 1) + "|"]
        for r in rows:
            name = f"**{r['method']}**" if r["method"] in refs else r["method"]
            ds = [(_pm(r["vs"][x]["target_diff_mean"], r["vs"][x]["target_diff_std"], True) if x in r["vs"] else "")
                  for x in refs]
            lines.append(f"| {name} | {_lr(r['lr'])} | {r['n']} | {_pm(r['target_mean'], r['target_std'])} | "
                         + " | ".join(ds) + f" | {_pm(r['source_mean'], r['source_std'])} |")
        grid = sorted({c["lr"] for c in summ["cells"] if c["protocol"] == p and c["lr"] is not None})
        if len(grid) > 1:
            lines += ["", "lr curves: selection mIoU, mean ± std (n) over the seeds of each lr; chosen lr in bold:", "",
                      "| method | " + " | ".join(f"{v:g}" for v in grid) + " |", "| --- " * (len(grid) + 1) + "|"]
            for r in sorted((r for r in rows if r["lr"] is not None), key=lambda r: _order(r["method"])):
                by = {c["lr"]: c for c in summ["cells"] if c["protocol"] == p and c["method"] == r["method"]}
                vals = []
                for v in grid:
                    c = by.get(v)
                    txt = "" if c is None else f"{_pm(c['select_mean'], c['select_std'])} ({c['n']})"
                    vals.append(f"**{txt}**" if c is not None and v == r["lr"] else txt)
                lines.append(f"| {r['method']} | " + " | ".join(vals) + " |")
        lines += ["", "Per-class target IoU at the chosen lr (mean over seeds):", "",
                  "| method | lr | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
        for r in sorted(rows, key=lambda r: _order(r["method"])):
            lines.append(f"| {r['method']} | {_lr(r['lr'])} | " + " | ".join(f"{v:.1f}" for v in r["target_IoU"])
                         + " |")
        trained = [r for r in rows if r["diag"]]
        keys = sorted({k for r in trained for k in r["diag"] if not k.startswith("loss")},
                      key=lambda k: (DIAG_ORDER.index(k) if k in DIAG_ORDER else len(DIAG_ORDER), k))
        if keys:
            lines += ["", "Diagnostics at the chosen lr (mean over logged steps and seeds; `cal_tune_*`: the "
                          "calibration's mIoU on the tune frames before/after):", "",
                      "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for r in sorted(trained, key=lambda r: _order(r["method"])):
                if any(k in r["diag"] for k in keys):
                    lines.append(f"| {r['method']} | " + " | ".join(
                        f"{r['diag'][k]:.4g}" if k in r["diag"] else "" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_lr_curves(result: dict, path: str | Path) -> None:
    """Selection mIoU vs lr per method (``+cal`` dashed), one panel per protocol with a grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = result["summary"]["cells"]
    rows = {(r["protocol"], r["method"]): r for r in result["summary"]["rows"]}
    panels = [p for p in PROTOCOLS if len({c["lr"] for c in cells if c["protocol"] == p and c["lr"]}) > 1]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, p in zip(axes[0], panels):
        bases = sorted({c["method"].removesuffix(CAL) for c in cells if c["protocol"] == p and c["lr"] is not None},
                       key=_order)
        for i, base in enumerate(bases):
            colour = f"C{i % 10}"
            for m, style in ((base, "-"), (base + CAL, "--")):
                cs = sorted((c for c in cells if c["protocol"] == p and c["method"] == m and c["lr"] is not None),
                            key=lambda c: c["lr"])
                if not cs:
                    continue
                shift = 1 + 0.05 * (i - (len(bases) - 1) / 2) + (0.012 if style == "--" else 0)  # bars side by side
                x = [c["lr"] * shift for c in cs]
                ax.errorbar(x, [c["select_mean"] for c in cs], yerr=[c["select_std"] for c in cs], fmt=style,
                            color=colour, marker="o", ms=3, capsize=2, label=m)
                best = rows[(p, m)]
                ax.plot([best["lr"] * shift], [best["select_mean"]], marker="*", ms=12, color=colour, ls="none")
        for start, style in (("ce_finetuned", "-."), ("ce_finetuned+cal", ":"), ("source_only", "-."),
                             ("source_only+cal", ":")):
            if (p, start) in rows:
                ax.axhline(rows[(p, start)]["select_mean"], color="grey", ls=style, lw=1, label=f"{start} (no training)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (Adam, constant)")
        ax.set_ylabel("selection mIoU (%), mean ± std over seeds")
        ax.set_title(f"CamVid day->dusk, {p}: * = chosen lr (bars: spread over seeds, not paired)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: str | Path, result: dict, plot: str | None = None) -> None:
    """The JSON and the markdown table (atomically); the lr curves when ``plot`` is given."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))  # an interrupted write never leaves half a file
    if plot:
        plot_lr_curves(result, plot)


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
    _write(args.out, result, None if partial else args.plot)  # the plot once, at the end
    return result


def merge(paths: list[str], out: str, plot: str | None = None) -> dict:
    """Combine result files of runs that differ only in their seeds, methods or lr grids (e.g.
    seeds split over parallel processes) into one result: runs pooled, commands listed, runtimes
    added up."""
    results = [json.loads(Path(p).with_suffix(".json").read_text()) for p in paths]
    ignore = {"seeds", "command", "commands", "methods", "protocols", "append", "threads", "device", "lrs",
              "source_lrs", "uda_lrs", "lrs_from", "plot", "order"}
    base = {k: v for k, v in results[0]["config"].items() if k not in ignore}
    runs: dict[tuple, dict] = {}
    for path, res in zip(paths, results):
        other = {k: v for k, v in res["config"].items() if k not in ignore}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise SystemExit(f"{path}: settings differ from {paths[0]} in {diff}; only seeds, methods and lr grids "
                             "may differ")
        for r in res["runs"]:
            runs.setdefault((r["protocol"], r["method"], r["seed"], r.get("lr")), r)
    cfg = dict(results[0]["config"])
    cfg["seeds"] = sorted({r["seed"] for r in runs.values()})
    cfg["lrs"] = sorted({float(v) for res in results for v in res["config"]["lrs"]})
    cfg["commands"] = [c for res in results for c in res["config"]["commands"]]
    cfg["processes"] = len(results)
    result = {"runs": list(runs.values()), "summary": summarize(list(runs.values())), "config": cfg,
              "runtime_s": round(sum(r["runtime_s"] for r in results), 1),
              "complete": all(r["complete"] for r in results)}
    _write(out, result, plot)
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
    p.add_argument("--lr", type=float, default=1e-3, help="CE fine-tuning lr")
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS),
                   help="lr grid of every after_ce method (and of from_source/uda unless given)")
    p.add_argument("--source-lrs", nargs="+", type=float, default=None, help="lr grid of from_source (default --lrs)")
    p.add_argument("--uda-lrs", nargs="+", type=float, default=None, help="lr grid of uda (default --lrs)")
    p.add_argument("--order", default="lr", choices=["lr", "method"],
                   help="per seed: all methods at one lr, then the next lr (lr), or each method's whole grid in turn")
    p.add_argument("--lrs-from", default=None, metavar="RESULT",
                   help="run each method only at the lrs chosen in this result file (its own and its +cal pipeline's)")
    p.add_argument("--steps", "--extra-steps", dest="extra_steps", type=int, default=200,
                   help="after_ce budget of every method (steps)")
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--uda-steps", type=int, default=200)
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
    p.add_argument("--plot", default=None, help="save the lr curves here (PNG): at the end of a run, or by --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULT",
                   help="only combine these result files (runs that differ in seeds, methods or lr grids) into "
                        "--out; trains nothing")
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
        merge(_args.merge, _args.out, _args.plot)
    else:
        run(_args)
