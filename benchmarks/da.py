"""Domain adaptation verdict: each method at its best learning rate, with and without calibration,
on named domain pairs (``--pair``). Every training run goes through the trainer.

Pairs (``--pair``; each defines the source, the target roles and the classes):

* ``camvid_dusk`` -- CamVid day -> dusk, 11 classes. Source = day sequences 0006R0 + 0016E5 of
  ``train/``. The dusk frames 0001TP of ``train/`` are split by frame number (neighbouring frames
  would leak otherwise): the first 2/3 *tune* (the labels every method trains and calibrates on,
  41 frames), the last 1/3 *selection* (21 frames: chooses each method's lr and nothing else).
  The scored *target evaluation* is the 62 dusk frames 0001TP of ``test/`` (later in the clip,
  never adjacent to the others); the source evaluation is the day frames of ``test/`` (Seq05VD).
  Without a ``test/`` folder (and no ``--eval-root``) the scored numbers are the selection
  split's: optimistic, and the outputs say so.
* ``camvid_idd`` -- CamVid (UK) -> IDD Lite (India), IDD Lite's 7 classes (CamVid's 11 mapped
  by ``label_map: camvid_to_idd``). Source = every CamVid frame of ``--root`` (train + val +
  test, day and dusk); source evaluation = every 4th frame of CamVid ``val/`` (inside the
  source's training set: it measures fit and forgetting, not generalisation). Target = IDD Lite
  ``train/`` (``--idd-root``) split *by sequence folder* once (``--split-seed``, the same for
  every seed, method and budget): *evaluation* (>= ``--eval-frames``, 700), *selection* (>=
  ``--select-frames``, 300) and the tune pool (the rest). ``--budget N`` labelled tune frames
  are taken round-robin over the pool's sequences (nested: the 16 frames are among the 64, the
  64 among the 256). ``uda`` trains on the pool and IDD Lite's unlabelled ``test/`` frames.

``--eval-root DIR --eval-split S`` scores any pair on another folder of its target's layout
(CamVid: its 0001TP frames; IDD Lite: every frame of the split, e.g. the official ``val``).
Frames are downscaled (``--size``) and decoded once per process into :class:`InMemoryDataset`.

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
                  pseudo-labels of the frozen ``src`` model (``pseudo_label.enabled``);
* ``semi``        from ``ce``, ``--semi-steps`` steps of each method on the tune labels *and* the
                  target frames without labels (the uda pool minus the tune frames), those
                  against the pseudo-labels of the frozen ``ce`` model
                  (``pseudo_label.only_unlabelled``); the tune frames are repeated to make up
                  ``--semi-labelled`` (0.5) of the training set. Semi-supervised: its rows are
                  also compared with after_ce's ``ce`` and ``lovasz`` (``after_ce:ce``), the
                  baselines that use the labels alone.

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
``self_training`` in uda), per-class IoU, the lr curves, the logged diagnostics' means. Paired differences come with a 95% interval
(Student t over the seed-paired differences) and the smallest effect the design detects at
that n (two-sided 5% test, 80% power: (t_0.975 + t_0.8) x sd / sqrt(n)).

    python benchmarks/da.py --pair camvid_idd --budget 64 --seeds 0 --protocols after_ce \\
        --work runs/da_idd --out runs/da_idd_s0 --append

writes ``runs/da_idd_s0.json`` and ``.md``, rewritten after every run (``--append`` resumes;
``--merge`` pools processes that ran other seeds, budgets, methods or lr grids;
``--skip-runs-in RESULT`` runs only what RESULT lacks, e.g. one more lr over a merged grid, and
``--lrs-from RESULT --lrs-budget 64`` only the lrs chosen there). Reproducible:
the same command, seed and ``--threads`` give the same numbers (every stage, batch order, flip,
sample and evaluation is seeded; ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import argparse
import hashlib
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
from segreward.data.formats import CamVidDataset, IDDLiteDataset, idd_sequence, idd_sequences, split_sequences
from segreward.data.memory import InMemoryDataset
from segreward.engine import config_from_dict, train
from segreward.engine.calibration import calibrate_model
from segreward.engine.trainer import evaluate
from segreward.models import build_model, load_weights
from segreward.errors import SegrewardError
from segreward.runlog import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result  # noqa: E402  (benchmarks/ is not a package)

IGNORE = 255
DAY, DUSK = ("0006R0", "0016E5"), "0001TP"
PAIRS = ("camvid_dusk", "camvid_idd")
PROTOCOLS = ("after_ce", "from_source", "uda", "semi")
SCOPES = ("image", "batch", "running")
LABELLED = ["ce", "lovasz", "ce_lovasz", "local_batch", "local_batch_ce"]
UDA = ["self_training", "local_pseudo_batch"]
REFERENCE = {"after_ce": "ce", "from_source": "ce", "uda": "self_training", "semi": "ce"}
# semi-supervised runs are also compared with these protocols' baselines (labels alone, same start)
CROSS = {"semi": "after_ce"}
FROM_CE = ("after_ce", "semi")  # the protocols that start from the CE fine-tuned checkpoint
# each protocol's steps per method run (the option that sets them)
STEPS_OPTION = {"after_ce": "extra_steps", "from_source": "source_steps", "uda": "uda_steps", "semi": "semi_steps"}
STARTS = ("source_only", "ce_finetuned")
CAL = "+cal"
LRS = [1e-4, 3e-4, 1e-3, 3e-3]
FLAGS = ("ce", "kl", "wmiou", "norm")
# Logged scalars that describe the run's bookkeeping, not the loss: left out of the diagnostics.
NOT_DIAGNOSTICS = {"step", "iter", "lr", "data_time", "time", "memory"}
DIAG_ORDER = ("reward_mean", "reward_std", "adv_std", "greedy_reward", "credit_abs", "credit_label_pos", "entropy",
              "kl", "pseudo_fraction", "cal_tune_before", "cal_tune_after")


# ----------------------------------------------------------------------------- methods
def method_loss(method: str, args, reward_weights: list[float], protocol: str = "after_ce") -> dict:
    """The trainer config sections (``loss``, ``pseudo_label``) of a method name (in ``semi``:
    pseudo-labels for the frames without labels only)."""
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
    if protocol == "semi":
        return {"loss": loss, "pseudo_label": {"enabled": True, "only_unlabelled": True, "threshold": args.threshold}}
    return {"loss": loss, "pseudo_label": {"enabled": pseudo, "threshold": args.threshold}}


def methods_of(protocol: str, wanted: list[str] | None) -> list[str]:
    """The methods run in a protocol: the defaults, or those of ``--methods`` that fit it; the
    reference of the paired differences is always run."""
    default = UDA if protocol == "uda" else LABELLED
    if wanted is None:
        return list(default)
    fits = [m for m in wanted if (m == "self_training" or "_pseudo_" in m) == (protocol == "uda")]
    return list(dict.fromkeys([REFERENCE[protocol]] + fits))


def reward_weights_from(y: torch.Tensor, num_classes: int) -> list[float]:
    """Inverse-sqrt pixel frequency of the tuning labels, mean 1 over the classes present."""
    counts = torch.bincount(y[y != IGNORE].flatten(), minlength=num_classes).double()
    freq = counts / counts.sum()
    w = torch.where(freq > 0, freq.clamp_min(1e-6).rsqrt(), torch.zeros_like(freq))
    return [round(v, 4) for v in (w / w[freq > 0].mean()).tolist()]


# ----------------------------------------------------------------------------- data
def _describe(ds: InMemoryDataset, where: str) -> str:
    return f"{len(ds)} frames of {where} ({ds.names[0]}..{ds.names[-1]})"


def load_data(args) -> dict:
    """Decode every frame set of ``args.pair`` once; returns the datasets (``source``,
    ``source_eval``, ``target_tune``, ``target_select``, ``target_eval``, ``target_unlabelled``),
    the classes, the label budget and a statement of which frames play which role."""
    sets, frames, info = (load_camvid_idd if args.pair == "camvid_idd" else load_camvid_dusk)(args)
    data = {k: InMemoryDataset.decode(ds) for k, ds in tqdm(list(sets.items()), desc="decode", leave=False)}
    if args.source_eval_every > 1:  # a subsample of the source frames measures the same fit, faster
        data["source_eval"] = data["source_eval"].subset(slice(None, None, args.source_eval_every))
        frames["source_eval"] += f", every {args.source_eval_every}th frame"
    data.update(info.pop("derive")(data, frames))
    data["frames"] = {k: _describe(data[k], v) for k, v in frames.items()}
    data["optimistic"] = "target_eval" not in sets
    if data["optimistic"]:  # no test split: the scored numbers are the selection split's
        data["target_eval"] = data["target_select"]
        data["frames"]["target_eval"] = ("the selection split (no test split or --eval-root): chosen on this split, "
                                         "optimistic")
    data["classes"] = list(data["source"].classes)
    data["num_classes"] = len(data["classes"])
    data["budget"] = len(data["target_tune"])
    data.update(info)
    return data


def load_camvid_dusk(args) -> tuple[dict, dict, dict]:
    kw = dict(size=tuple(args.size), cache=False)
    root = Path(args.root)
    sets = {"source": CamVidDataset(root, "train", sequences=list(DAY), **kw),
            "target_tune": CamVidDataset(root, "train", sequences=DUSK, frames=(0, 2 / 3), **kw),
            "target_select": CamVidDataset(root, "train", sequences=DUSK, frames=(2 / 3, 1), **kw)}
    frames = {"source": f"day {'+'.join(DAY)} of `{root}/train`",
              "target_tune": f"dusk {DUSK} of `{root}/train`, first 2/3 by frame number",
              "target_select": f"dusk {DUSK} of `{root}/train`, last 1/3 by frame number (held out from tuning)"}
    ev, note = (Path(args.eval_root), " (--eval-root)") if args.eval_root else (root, "")
    if args.eval_root is None and not (root / args.eval_split).is_dir():
        ev = None
    if ev is None:
        sets["source_eval"] = CamVidDataset(root, "val", **kw)
        frames["source_eval"] = f"`{root}/val`"
    else:
        sets["target_eval"] = CamVidDataset(ev, args.eval_split, sequences=DUSK, **kw)
        frames["target_eval"] = f"dusk {DUSK} of `{ev}/{args.eval_split}`{note}"
        try:
            sets["source_eval"] = CamVidDataset(ev, args.eval_split, exclude_sequences=DUSK, **kw)
            seqs = "+".join(sets["source_eval"].sequences)
            frames["source_eval"] = f"{seqs} of `{ev}/{args.eval_split}`{note}"
        except SegrewardError:  # the eval split holds dusk frames only: keep the day val of --root
            sets["source_eval"] = CamVidDataset(root, "val", **kw)
            frames["source_eval"] = f"`{root}/val` (`{ev}/{args.eval_split}` has no other sequence)"

    def derive(data, frames):  # uda: the tune frames without their labels
        frames["target_unlabelled"] = frames["target_tune"] + ", labels dropped"
        return {"target_unlabelled": unlabelled(data["target_tune"])}
    return sets, frames, {"derive": derive, "split": {"tune": sets["target_tune"].names}}


def load_camvid_idd(args) -> tuple[dict, dict, dict]:
    kw = dict(size=tuple(args.size), cache=False)
    croot, iroot = Path(args.root), Path(args.idd_root)
    splits = "+".join(s for s in ("train", "val", "test") if (croot / s).is_dir() and (croot / f"{s}annot").is_dir())
    parts, pool = idd_roles(args)
    if args.budget > len(pool):
        raise SystemExit(f"--budget {args.budget}: the tune pool has only {len(pool)} frames "
                         f"({len(parts['pool'])} sequences)")
    tune = pool[:args.budget]
    sets = {"source": CamVidDataset(croot, splits, label_map="camvid_to_idd", **kw),
            "source_eval": CamVidDataset(croot, "val" if (croot / "val").is_dir() else splits.split("+")[0],
                                         label_map="camvid_to_idd", **kw),
            "target_tune": IDDLiteDataset(iroot, "train", names=tune, **kw),
            "target_select": IDDLiteDataset(iroot, "train", sequences=parts["selection"], **kw)}
    n_seq = len({idd_sequence(n) for n in tune})
    frames = {"source": f"every CamVid frame of `{croot}` ({splits}, day and dusk), 11 classes mapped to IDD Lite's 7",
              "source_eval": f"CamVid `{croot}/val` (part of the source training set: fit, not generalisation)",
              "target_tune": f"IDD Lite `{iroot}/train`, budget {args.budget}: {len(tune)} frames of {n_seq} "
                             f"sequences of the tune pool ({len(pool)} frames, {len(parts['pool'])} sequences), "
                             "round-robin over its sequences",
              "target_select": f"IDD Lite `{iroot}/train`, {len(parts['selection'])} sequences (split seed "
                               f"{args.split_seed})"}
    if args.eval_root:
        sets["target_eval"] = IDDLiteDataset(args.eval_root, args.eval_split, **kw)
        frames["target_eval"] = f"every frame of IDD Lite `{args.eval_root}/{args.eval_split}` (--eval-root)"
    else:
        sets["target_eval"] = IDDLiteDataset(iroot, "train", sequences=parts["evaluation"], **kw)
        frames["target_eval"] = (f"IDD Lite `{iroot}/train`, {len(parts['evaluation'])} sequences (split seed "
                                 f"{args.split_seed}; no choice is made on them)")
    extra = IDDLiteDataset(iroot, "test", labelled=False, **kw) if (iroot / "leftImg8bit" / "test").is_dir() else None
    if extra is not None:
        sets["unlabelled_extra"] = extra

    def derive(data, frames):  # uda: the whole tune pool without labels, plus IDD Lite's unlabelled test frames
        pool_set = InMemoryDataset.decode(IDDLiteDataset(iroot, "train", names=pool, labelled=False, **kw))
        parts_u = [pool_set] + ([data.pop("unlabelled_extra")] if extra is not None else [])
        frames.pop("unlabelled_extra", None)
        frames["target_unlabelled"] = (f"IDD Lite tune pool ({len(pool)} frames, labels dropped)"
                                       + (f" + {len(extra)} unlabelled frames of `{iroot}/leftImg8bit/test`"
                                          if extra is not None else ""))
        return {"target_unlabelled": concat(parts_u)}
    return sets, frames, {"derive": derive, "split": {**parts, "tune": tune}}


def idd_roles(args) -> tuple[dict[str, list[str]], list[str]]:
    """IDD Lite ``train`` sequences split into ``evaluation`` / ``selection`` / ``pool`` (by
    ``--split-seed``), and the pool's frames in budget order (round-robin over its sequences)."""
    iroot = Path(args.idd_root)
    seqs = idd_sequences(iroot, "train")
    parts = split_sequences(seqs, {"evaluation": args.eval_frames, "selection": args.select_frames, "pool": -1},
                            seed=args.split_seed)
    by_seq: dict[str, list[str]] = {s: [] for s in parts["pool"]}
    for name in IDDLiteDataset(iroot, "train", sequences=parts["pool"], verify=False).names:  # sorted by name
        by_seq[idd_sequence(name)].append(name)
    return parts, round_robin(by_seq)


def write_split(args, folder: str | Path) -> None:
    """The frame lists of the camvid_idd roles as text files (one ``<seq>/<id>`` a line), for
    configs (``{type: idd_lite, names: FILE}``): evaluation, selection, pool, tune<N> per budget."""
    parts, pool = idd_roles(args)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iroot = Path(args.idd_root)
    lists = {k: IDDLiteDataset(iroot, "train", sequences=parts[k], verify=False).names
             for k in ("evaluation", "selection")}
    lists["pool"] = pool
    lists.update({f"tune{n}": pool[:n] for n in (16, 64, 256) if n <= len(pool)})
    for name, names in lists.items():
        (folder / f"{name}.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {', '.join(f'{k} ({len(v)})' for k, v in lists.items())} to {folder}")


def round_robin(by_seq: dict[str, list[str]]) -> list[str]:
    """Frames taken one per sequence in turn (sequences in the given order, frames in theirs): any
    prefix spreads over as many sequences as it can."""
    out, k = [], 0
    while len(out) < sum(map(len, by_seq.values())):
        out += [v[k] for v in by_seq.values() if k < len(v)]
        k += 1
    return out


def unlabelled(ds: InMemoryDataset) -> InMemoryDataset:
    """The same images with every label pixel set to the ignore index."""
    return InMemoryDataset(ds.images, torch.full_like(ds.labels, ds.ignore_index), ds.classes, ds.ignore_index,
                           None, ds.names)


def semi_set(data: dict, labelled: float) -> tuple[InMemoryDataset, str]:
    """The semi protocol's training set: the tune frames (labels kept), repeated to make up about
    ``labelled`` of it, and the target frames without labels outside them; and its description."""
    tune, pool = data["target_tune"], data["target_unlabelled"]
    names = set(tune.names)
    keep = [i for i, n in enumerate(pool.names) if n not in names]
    if not keep:
        raise SystemExit("--protocols semi: this pair has no target frames without labels beyond the tune frames "
                         f"({data['frames']['target_unlabelled']})")
    extra = pool.subset(keep)
    reps = max(1, round(labelled / (1 - labelled) * len(extra) / len(tune)))
    text = (f"the {len(tune)} tune frames (labels kept) x {reps} + {len(extra)} target frames without labels "
            f"(pseudo-labels of the frozen CE fine-tuned model): {data['frames']['target_unlabelled']} minus the "
            "tune frames")
    return concat([tune] * reps + [extra]), text


def concat(parts: list[InMemoryDataset]) -> InMemoryDataset:
    return InMemoryDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                           parts[0].classes, parts[0].ignore_index, None, [n for p in parts for n in p.names])


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
            "model": {"name": "unet", "num_classes": args.num_classes, "options": {"width": args.width},
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
    model = build_model("unet", args.num_classes, width=args.width)
    load_weights(model, path)
    return model.to(_device(args))


def score_model(model: nn.Module, data: dict, args) -> dict:
    val = {k: evaluate(model, ds, args.num_classes, IGNORE, device=_device(args)) for k, ds in eval_sets(data).items()}
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


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_result(path: str | Path, option: str = "") -> dict:
    """A result file of this script (a run or ``--merge``; the ``.json`` suffix may be left off),
    or a clear error naming the file (and the option that named it)."""
    path = Path(path).with_suffix(".json")
    try:
        res = json.loads(path.read_text())
        res["runs"], res["summary"], res["config"]  # noqa: B018  (the parts every reader uses)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{option + ' ' if option else ''}{path}: not a result file of benchmarks/da.py "
                         f"({type(e).__name__}: {e})") from None
    return res


def chosen_lrs_from(path: str, budget: int | None = None) -> dict[tuple[str, str], float]:
    """``(protocol, method) -> chosen lr`` of an earlier result file (``--lrs-from``), at label
    budget ``budget`` (``--lrs-budget``; None: the file must hold one budget per protocol)."""
    res = read_result(path, "--lrs-from")
    rows = [r for r in res["summary"]["rows"] if r["lr"] is not None]
    budgets = sorted({r.get("budget") for r in rows}, key=lambda b: -1 if b is None else b)
    if budget is None and len(budgets) > 1:
        raise SystemExit(f"--lrs-from {path}: lrs chosen at budgets {budgets}; say which with --lrs-budget")
    if budget is not None and budget not in budgets:
        raise SystemExit(f"--lrs-from {path}: no lrs chosen at budget {budget}; there: {budgets}")
    return {(r["protocol"], r["method"]): r["lr"] for r in rows if budget is None or r.get("budget") == budget}


def lr_plan(args, protocol: str, method: str, chosen: dict | None) -> list[float]:
    """The lrs a method runs at: its protocol's grid, or (``--lrs-from``) the lrs chosen there for
    the method and for its ``+cal`` pipeline."""
    grid = {"after_ce": args.lrs, "from_source": args.source_lrs or args.lrs, "uda": args.uda_lrs or args.lrs,
            "semi": args.semi_lrs or args.lrs}[protocol]
    if chosen is None:
        return list(grid)
    picked = [chosen.get((protocol, method)), chosen.get((protocol, method + CAL))]
    if picked[0] is None:
        raise SystemExit(f"--lrs-from {args.lrs_from}: no chosen lr for {protocol} {method}; run its grid first")
    return list(dict.fromkeys(v for v in picked if v is not None))


def run(args) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    # Same command, seed and thread count -> same numbers (CPU kernels are deterministic at a
    # fixed thread count; on CUDA this also picks deterministic kernels where torch has them).
    torch.use_deterministic_algorithms(True, warn_only=True)
    # the result files it was given are read first: a bad one fails before minutes of decoding
    chosen = chosen_lrs_from(args.lrs_from, args.lrs_budget) if args.lrs_from else None
    out_json = Path(args.out).with_suffix(".json")
    previous: list[dict] = []
    if args.append and out_json.exists():
        old = read_result(out_json, "--append --out")
        previous = old["runs"]
        args.prev_runtime_s = float(old.get("runtime_s", 0.0))
        args.prev_commands = old["config"].get("commands", [])
        args.prev_processes = int(old["config"].get("processes") or 1)  # a merged file's processes, and this one
    done = {run_key(r) for r in previous}
    for path in args.skip_runs_in or []:  # runs another file holds: not run again, not copied (--merge pools them)
        done |= {run_key(r) for r in read_result(path, "--skip-runs-in")["runs"]}
    methods = {p: methods_of(p, args.methods) for p in args.protocols}
    plan = {(p, m): lr_plan(args, p, m, chosen) for p in methods for m in methods[p]}
    data = load_data(args)
    args.num_classes = data["num_classes"]
    tune = data["target_tune"]
    weights = reward_weights_from(tune.labels, args.num_classes)
    budget = {p: getattr(args, k) for p, k in STEPS_OPTION.items()}
    budget_n = data["budget"]
    if "semi" in methods:
        data["target_semi"], data["frames"]["target_semi"] = semi_set(data, args.semi_labelled)
    runs: list[dict] = list(previous)
    temp_work = args.work is None
    work_root = Path(tempfile.mkdtemp(prefix="da_")) if temp_work else Path(args.work)
    finetune = any(p in methods for p in FROM_CE)
    per_seed = args.pretrain_steps + finetune * args.finetune_steps + sum(len(v) * budget[p]
                                                                          for (p, _), v in plan.items())
    print(f"pair {args.pair}: source {len(data['source'])}, target tune {len(tune)}, selection {len(data['target_select'])}, "
          f"target eval {len(data['target_eval'])}{' (= selection)' if data['optimistic'] else ''}, source eval "
          f"{len(data['source_eval'])}, unlabelled {len(data['target_unlabelled'])} frames at {args.size[0]}x{args.size[1]}; {per_seed} steps of batch "
          f"{args.batch} per seed; runs in {work_root}", flush=True)
    bar = tqdm(total=per_seed * len(args.seeds), desc=args.pair, unit="step", dynamic_ncols=True)

    def key(protocol, method, seed, lr):
        return run_key({"pair": args.pair, "budget": budget_n, "protocol": protocol, "method": method, "seed": seed,
                        "lr": lr})

    def record(protocol, method, seed, lr, steps, s, diag=None, t0=None):
        if key(protocol, method, seed, lr) in done:
            return
        row = {"pair": args.pair, "protocol": protocol, "budget": budget_n, "method": method, "seed": seed, "lr": lr,
               "steps": steps, **s, "diag": diag or {}, "time_s": round(time.perf_counter() - t0, 1) if t0 else None}
        runs.append(row)
        done.add(key(protocol, method, seed, lr))
        tqdm.write(f"seed {seed} {protocol:11s} {method:22s} lr {lr if lr is not None else '-':<7} target "
                   f"{row['target_mIoU']:6.2f} select {row['select_mIoU']:6.2f} source {row['source_mIoU']:6.2f}"
                   + (f" ({row['time_s']:.0f} s)" if t0 else ""))
        save(args, runs, data, t_start, weights, partial=True)

    def record_with_cal(protocol, method, seed, lr, steps, s, weights_path, diag=None, t0=None):
        record(protocol, method, seed, lr, steps, s, diag, t0)
        if key(protocol, method + CAL, seed, lr) not in done:
            t1 = time.perf_counter()
            cs, info = calibrated(args, weights_path, data)
            record(protocol, method + CAL, seed, lr, steps, cs, info, t1)

    try:
        for seed in args.seeds:
            sdir = work_root / f"seed{seed}"
            # what makes a stage's weights: config, data, and the float order (threads, torch build);
            # a stage trained under other threads is another model (issue 20: the 21-frame verdict
            # reused a seed-0 stage trained elsewhere and could not be reproduced)
            # and the CPU's vector instructions (AVX2 and AVX-512 kernels sum in other orders: the
            # same seed's CE start differed by 0.8 mIoU between two machines of one kind)
            reuse = {"pair": args.pair, "root": str(Path(args.root).resolve()), "size": list(args.size),
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "cpu": torch.backends.cpu.get_cpu_capability()}
            t0 = time.perf_counter()
            cfg = run_config(args, sdir / "pretrain", seed, "pretrain", args.pretrain_steps, args.pretrain_lr, None,
                             {"loss": {"type": "ce"}}, args.stage_schedule)
            bar.set_postfix_str(f"seed {seed} pretrain")
            s = run_stage(cfg, data, data["source"], args, {**reuse, "cfg": cfg})
            bar.update(args.pretrain_steps)
            src = str(sdir / "pretrain" / "model.safetensors")
            for p in ("from_source", "uda"):
                if p in methods:
                    record_with_cal(p, "source_only", seed, None, 0, s, src, t0=t0)
            bdir = sdir / f"N{budget_n}"
            ce = str(bdir / "finetune" / "model.safetensors")
            if finetune:
                t0 = time.perf_counter()
                cfg = run_config(args, bdir / "finetune", seed + 1, "pretrain", args.finetune_steps, args.lr, src,
                                 {"loss": {"type": "ce"}}, args.stage_schedule)
                bar.set_postfix_str(f"seed {seed} CE fine-tune")
                # the start's bytes too: a retrained pretrain stage is another start at the same path
                s = run_stage(cfg, data, tune, args, {**reuse, "tune": list(tune.names), "cfg": cfg,
                                                      "start_sha256": _sha256(src)})
                bar.update(args.finetune_steps)
                record_with_cal("after_ce", "ce_finetuned", seed, None, 0, s, ce, t0=t0)
            # identical batches and flips for every method and lr of this seed
            seeded = {"after_ce": tune.seeded(seed + 2), "from_source": tune.seeded(seed + 2),
                      "uda": data["target_unlabelled"].seeded(seed + 2)}
            if "semi" in methods:
                seeded["semi"] = data["target_semi"].seeded(seed + 2)
            for protocol in args.protocols:
                steps = budget[protocol]
                lrs = list(dict.fromkeys(lr for m in methods[protocol] for lr in plan[(protocol, m)]))
                # --order lr: every method at one lr before the next lr (a stopped run has whole lr
                # columns); --order method: a method's whole lr grid before the next method
                todo = ([(m, lr) for lr in lrs for m in methods[protocol] if lr in plan[(protocol, m)]]
                        if args.order == "lr" else [(m, lr) for m in methods[protocol] for lr in plan[(protocol, m)]])
                for method, lr in todo:
                    if {key(protocol, method, seed, lr), key(protocol, method + CAL, seed, lr)} <= done:
                        bar.update(steps)
                        continue
                    t0 = time.perf_counter()
                    work = bdir / protocol / method / f"lr{lr:g}"
                    cfg = run_config(args, work, seed + 2, "tune", steps, lr,
                                     ce if protocol in FROM_CE else src,
                                     method_loss(method, args, weights, protocol))
                    bar.set_postfix_str(f"seed {seed} {protocol} {method} lr {lr:g}")
                    s = run_stage(cfg, data, seeded[protocol], args)
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


def run_key(r: dict) -> tuple:
    """What identifies a run in a result file: pair, label budget, protocol, method, seed, lr."""
    return (r.get("pair"), r.get("budget"), r["protocol"], r["method"], r["seed"], r.get("lr"))


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


def references(protocol: str, method: str) -> list[str]:
    """What a row is compared with: the protocol's reference, ``ce`` and ``lovasz`` (in semi also
    after_ce's, named ``after_ce:ce``); a calibrated pipeline also with their calibrated pipelines
    (like for like)."""
    refs = [REFERENCE[protocol], "ce", "lovasz"]
    if protocol in CROSS:
        refs += [f"{CROSS[protocol]}:{r}" for r in ("ce", "lovasz")]
    if method.endswith(CAL):
        refs += [r + CAL for r in refs]
    if protocol in CROSS:  # and the same pipeline on the labels alone: what the pseudo-labels add
        refs.append(f"{CROSS[protocol]}:{method}")
    return list(dict.fromkeys(refs))


def _ref_group(protocol: str, ref: str) -> tuple[str, str]:
    """``(protocol, method)`` of a reference name (``after_ce:ce`` names another protocol's)."""
    other, _, method = ref.rpartition(":")
    return (other or protocol), method


def paired(diffs: list[float]) -> dict:
    """Mean, std, 95% interval (Student t) of seed-paired differences, and the smallest paired
    effect this n detects (two-sided 5% test, 80% power) at the observed spread."""
    from scipy import stats
    mean, sd = _mean_std(diffs)
    out = {"diff_mean": mean, "diff_std": sd, "diffs": [round(x, 3) for x in diffs], "ci95": None, "mde": None}
    n = len(diffs)
    if n >= 2:
        se = sd / np.sqrt(n)
        half = float(stats.t.ppf(0.975, n - 1) * se)
        out["ci95"] = [mean - half, mean + half]
        out["mde"] = float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * se)
    return out


def summarize(runs: list[dict]) -> dict:
    """``cells``: per (protocol, budget, method, lr) mean ± std of each split over seeds (the lr
    curves); ``rows``: per (protocol, budget, method) at its chosen lr, with seed-paired
    differences (95% interval, detectable effect) to ``ce``, ``lovasz`` (and the protocol's
    reference) at *their* chosen lrs and the diagnostics' means; ``goals``: the issue's criterion
    for after_ce at each budget."""
    groups: dict[tuple, dict] = {}
    for r in runs:
        groups.setdefault((r["protocol"], r.get("budget"), r["method"]), {}).setdefault(r.get("lr"), {})[r["seed"]] = r
    cells = []
    for (p, b, m), by_lr in groups.items():
        for lr, by_seed in sorted(by_lr.items(), key=lambda kv: _lr_key(kv[0])):
            cell = {"protocol": p, "budget": b, "method": m, "lr": lr, "n": len(by_seed), "seeds": sorted(by_seed)}
            for side in ("target", "select", "source"):
                cell[f"{side}_mean"], cell[f"{side}_std"] = _mean_std([r[f"{side}_mIoU"] for r in by_seed.values()])
            cells.append(cell)
    best = {key: choose_lr(by_lr) for key, by_lr in groups.items()}
    rows = []
    for (p, b, m), by_lr in groups.items():
        lr, lr_seeds = best[(p, b, m)]
        by_seed = by_lr[lr]
        rs = list(by_seed.values())
        row = {"protocol": p, "budget": b, "method": m, "lr": lr, "lr_grid": sorted((v for v in by_lr if v is not None)),
               "lr_chosen_on_seeds": lr_seeds, "n": len(rs), "seeds": sorted(by_seed)}
        for side in ("target", "select", "source"):
            row[f"{side}_mean"], row[f"{side}_std"] = _mean_std([r[f"{side}_mIoU"] for r in rs])
        row["target_IoU"] = [round(float(v), 2) for v in np.mean([r["target_IoU"] for r in rs], 0)]
        row["vs"] = {}
        for ref in references(p, m):
            rp, rm = _ref_group(p, ref)
            if ref == m or (rp, b, rm) not in groups:
                continue
            ref_rows = groups[(rp, b, rm)][best[(rp, b, rm)][0]]
            common = sorted(set(by_seed) & set(ref_rows))
            if not common:
                continue
            d = {"ref_lr": best[(rp, b, rm)][0], "seeds": common}
            for side in ("target", "source"):
                st = paired([by_seed[s][f"{side}_mIoU"] - ref_rows[s][f"{side}_mIoU"] for s in common])
                d.update({f"{side}_{k}": v for k, v in st.items()})
            row["vs"][ref] = d
        keys = sorted({k for r in rs for k in r.get("diag", {}) if k != "offsets"})
        row["diag"] = {k: float(np.mean([r["diag"][k] for r in rs if k in r.get("diag", {})])) for k in keys}
        rows.append(row)
    budgets = sorted({r["budget"] for r in rows if r["protocol"] == "after_ce"}, key=lambda v: -1 if v is None else v)
    goals = [g for g in (goal(rows, budget=b) for b in budgets) if g]
    goals += [g for b in budgets for g in [goal(rows, protocol="semi", budget=b)] if g]
    return {"cells": cells, "rows": rows, "goals": goals}


def goal(rows: list[dict], protocol: str = "after_ce", budget: int | None = None, over_ce: float | None = None,
         over_lovasz: float = 0.5, min_seeds: int = 5, max_half_width: float = 0.5) -> dict | None:
    """Issue 20's criterion at one label budget: the best reward-optimising pipeline (by mean
    selection mIoU) beats the best-lr extra CE by >= ``over_ce`` target mIoU (+2.0; +1.0 from 256
    labels on) and the best-lr Lovász by >= ``over_lovasz``, seed-paired, n >= ``min_seeds``,
    the 95% interval above 0 and its half-width <= ``max_half_width``."""
    if over_ce is None:
        over_ce = 1.0 if budget is not None and budget >= 256 else 2.0
    cands = [r for r in rows if r["protocol"] == protocol and r["budget"] == budget and reward_pipeline(r["method"])]
    if not cands:
        return None
    best = max(cands, key=lambda r: r["select_mean"])
    base = f"{CROSS[protocol]}:" if protocol in CROSS else ""  # the baselines: labels alone, after CE fine-tuning

    def ok(d, margin):
        return bool(d and len(d["seeds"]) >= min_seeds and d["target_diff_mean"] >= margin and d["target_ci95"]
                    and d["target_ci95"][0] > 0 and (d["target_ci95"][1] - d["target_ci95"][0]) / 2 <= max_half_width)

    def brief(d):
        return d and {"mean": d["target_diff_mean"], "std": d["target_diff_std"], "n": len(d["seeds"]),
                      "ci95": d["target_ci95"], "mde": d["target_mde"]}
    ce, lz = best["vs"].get(base + "ce"), best["vs"].get(base + "lovasz")
    ok_ce, ok_lz = ok(ce, over_ce), ok(lz, over_lovasz)
    same = {f"vs_{protocol}_{k}": brief(best["vs"].get(k)) for k in ("ce", "ce" + CAL)} if base else {}
    return {"protocol": protocol, "budget": budget, "best": best["method"], "lr": best["lr"],
            "vs_ce": brief(ce), "vs_lovasz": brief(lz),
            "vs_ce_cal": brief(best["vs"].get(base + "ce" + CAL)),
            "vs_lovasz_cal": brief(best["vs"].get(base + "lovasz" + CAL)), **same,
            "met_vs_ce": ok_ce, "met_vs_lovasz": ok_lz,
            "met": ok_ce and ok_lz,
            "criterion": f"Δ vs ce >= {over_ce:g} and Δ vs lovasz >= {over_lovasz:g}, each seed-paired with n >= "
                         f"{min_seeds}, 95% interval above 0 and half-width <= {max_half_width:g}"}


def _pm(mean: float, std: float, sign: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}" if sign else f"{mean:.2f} ± {std:.2f}"


def _lr(lr) -> str:
    return "—" if lr is None else f"{lr:g}"


def _order(method: str) -> tuple:
    base = method[:-len(CAL)] if method.endswith(CAL) else method
    known = list(STARTS) + LABELLED + UDA
    return (known.index(base) if base in known else len(known), base, method.endswith(CAL))


TITLES = {"camvid_dusk": "CamVid day -> dusk", "camvid_idd": "CamVid (UK) -> IDD Lite (India)"}


def _ci(d: dict, side: str = "target") -> str:
    """``+1.23 [0.80, 1.66]`` (mean and 95% interval of the paired differences) or ``+1.23 (n=1)``."""
    ci = d.get(f"{side}_ci95")
    m = d[f"{side}_diff_mean"]
    return f"{m:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{m:+.2f} (n={len(d['seeds'])})"


def _sections(summ: dict) -> list[tuple[str, object]]:
    keys = {(r["protocol"], r.get("budget")) for r in summ["rows"]}
    return sorted(keys, key=lambda k: (PROTOCOLS.index(k[0]), -1 if k[1] is None else k[1]))


def markdown(result: dict) -> str:
    cfg = result["config"]
    fr = cfg["frames"]
    summ = result["summary"]
    optimistic = "optimistic" in fr["target_eval"]
    ran = {r["protocol"] for r in summ["rows"]}
    scored = "selection split, chosen on it: optimistic" if optimistic else "evaluation split"
    pair = cfg.get("pair", "camvid_dusk")
    lines = [f"# {TITLES.get(pair, pair)}: each method at its best lr, with and without calibration", "",
             "Commands: " + "; then ".join(f"`{c}`" for c in cfg["commands"]) + "  ",
             f"Total runtime: {result['runtime_s']:.0f} s ({cfg['threads']} CPU thread(s) per process, device "
             f"{cfg['device']}" + (f"; the sum over {cfg['processes']} processes run side by side, seeds split "
                                   "between them" if cfg.get("processes", 1) > 1 else "") + "). "
             f"Seeds: {cfg['seeds']}." + ("" if result["complete"] else " **Partial results (run not finished).**"),
             "", "Frames:", "",
             f"- source training: {fr['source']}",
             f"- target tuning (training and calibration labels): {fr['target_tune']}"
             + (" (per label budget)" if len(cfg.get("budgets", [])) > 1 else ""),
             f"- selection (chooses each method's lr, nothing else): {fr['target_select']}",
             f"- **target evaluation (scored, no choice made on it): {fr['target_eval']}**",
             f"- source evaluation (scored): {fr['source_eval']}"]
    if "target_unlabelled" in fr and "uda" in ran:
        lines.append(f"- uda training (no labels): {fr['target_unlabelled']}")
    if "target_semi" in fr and "semi" in ran:
        lines.append(f"- semi training: {fr['target_semi']}")
    lines.append("")
    if optimistic:
        lines += ["**No test split here: the target numbers below are the selection split's, on which each "
                  "method's lr was chosen (optimistic for every row alike; the calibration offsets are fitted on "
                  "the tune frames only).**", ""]
    lines += [f"Frames at {cfg['size'][0]}x{cfg['size'][1]}; U-Net width {cfg['width']}; every training run is a "
              f"`segreward.engine.train` run (Adam, constant lr, random flips drawn per sample from (seed, epoch, "
              f"frame) so every method and lr of a seed sees the same batches; one evaluation at its end).",
              f"Steps (batch {cfg['batch']}): pretrain {cfg['pretrain_steps']} (lr {cfg['pretrain_lr']}), "
              f"CE fine-tune {cfg['finetune_steps']} (lr {cfg['lr']}), then per method run: "
              + ", ".join(f"{p} {cfg[k]}" for p, k in STEPS_OPTION.items() if p in ran)
              + (f" (pseudo-label threshold {cfg['threshold']})" if {"uda", "semi"} & ran else "") + "; lr grids: "
              + ", ".join(f"{p} {sorted({c['lr'] for c in summ['cells'] if c['protocol'] == p and c['lr']})}"
                          for p in PROTOCOLS if p in ran) + ". `ce_lovasz` = Lovász + CE 1:1; `_ce` = CE anchor of weight "
              f"{cfg['ce_anchor']}; local methods: loss.estimator=local, K=1. `+cal` = the run's model with class "
              "offsets fitted on the tune frames (exact mIoU search) folded into its bias: no training.", "",
              "mIoU in percent, mean ± std over seeds. Each method's (and each `+cal` pipeline's) lr is the grid "
              "point with the best mean selection mIoU over the seeds that ran the whole grid. Δ = seed-paired "
              "difference to `ce` / `lovasz` at *their* chosen lrs: mean [95% interval] over the seeds both have "
              "(Student t); *detectable* = the smallest paired effect this n and spread detect (5% two-sided, 80% "
              "power). Compare calibrated rows with calibrated rows.", ""]
    goals = summ.get("goals") or []
    if goals:
        def fmt(v):
            if not v:
                return "n/a"
            ci = f" [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}], detectable {v['mde']:.2f}" if v["ci95"] else ""
            return f"{v['mean']:+.2f}{ci} (n={v['n']})"
        lines += ["## Goal", ""]
        for g in goals:
            lines.append(f"- {g['protocol']}, budget {g['budget']}: criterion {g['criterion']}. Best reward-optimising pipeline by "
                         f"mean selection mIoU: **{g['best']}** (lr {_lr(g['lr'])}): Δ vs ce {fmt(g['vs_ce'])}, Δ vs "
                         f"lovasz {fmt(g['vs_lovasz'])} -> **{'met' if g['met'] else 'not met'}**"
                         + (f"; like for like, Δ vs ce+cal {fmt(g.get('vs_ce_cal'))}, vs lovasz+cal "
                            f"{fmt(g.get('vs_lovasz_cal'))}" if g.get("vs_ce_cal") or g.get("vs_lovasz_cal") else "")
                         + ".")
        lines.append("")
    classes = cfg["classes"]
    for p, b in _sections(summ):
        rows = sorted((r for r in summ["rows"] if r["protocol"] == p and r.get("budget") == b),
                      key=lambda r: -r["target_mean"])
        cells = [c for c in summ["cells"] if c["protocol"] == p and c.get("budget") == b]
        refs = [x for x in references(p, "x" + CAL) if any(r["method"] == x for r in rows)]
        lines += [f"## {p}" + (f", {b} labelled target frames" if b is not None else ""), "",
                  f"Target mIoU = {scored}.", "",
                  "| method | lr | n | target mIoU | " + " | ".join(f"Δ vs {x} [95%] | detectable" for x in refs)
                  + " | selection mIoU | source mIoU |", "| --- " * (6 + 2 * len(refs)) + "|"]
        for r in rows:
            name = f"**{r['method']}**" if r["method"] in refs else r["method"]
            ds = []
            for x in refs:
                d = r["vs"].get(x)
                ds += [_ci(d), f"{d['target_mde']:.2f}" if d and d.get("target_mde") else ""] if d else ["", ""]
            lines.append(f"| {name} | {_lr(r['lr'])} | {r['n']} | {_pm(r['target_mean'], r['target_std'])} | "
                         + " | ".join(ds) + f" | {_pm(r['select_mean'], r['select_std'])} | "
                         f"{_pm(r['source_mean'], r['source_std'])} |")
        grid = sorted({c["lr"] for c in cells if c["lr"] is not None})
        if len(grid) > 1:
            lines += ["", "lr curves: selection mIoU, mean ± std (n) over the seeds of each lr; chosen lr in bold:", "",
                      "| method | " + " | ".join(f"{v:g}" for v in grid) + " |", "| --- " * (len(grid) + 1) + "|"]
            for r in sorted((r for r in rows if r["lr"] is not None), key=lambda r: _order(r["method"])):
                by = {c["lr"]: c for c in cells if c["method"] == r["method"]}
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
    summ = result["summary"]
    pair = result["config"].get("pair", "camvid_dusk")
    panels = [(p, b) for p, b in _sections(summ)
              if len({c["lr"] for c in summ["cells"] if (c["protocol"], c.get("budget")) == (p, b) and c["lr"]}) > 1]
    if not panels:
        return
    ncols = min(3, len(panels))  # a grid of panels, not one long strip
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (p, b) in zip(axes.flat, panels):
        cells = [c for c in summ["cells"] if (c["protocol"], c.get("budget")) == (p, b)]
        rows = {(p, r["method"]): r for r in summ["rows"] if (r["protocol"], r.get("budget")) == (p, b)}
        bases = sorted({c["method"].removesuffix(CAL) for c in cells if c["lr"] is not None}, key=_order)
        for i, base in enumerate(bases):
            colour = f"C{_order(base)[0] % 10}"  # one colour per method in every panel
            for m, style in ((base, "-"), (base + CAL, "--")):
                cs = sorted((c for c in cells if c["method"] == m and c["lr"] is not None),
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
        ax.set_title(f"{TITLES.get(pair, pair)}, {p}" + (f", N={b}" if b is not None else "")
                     + ": * = chosen lr\n(bars: spread over seeds, not paired)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: str | Path, result: dict, plot: str | None = None) -> None:
    """The JSON and the markdown table (atomically); the lr curves when ``plot`` is given."""
    write_result(out, result, markdown(result))
    if plot:
        plot_lr_curves(result, plot)


def save(args, runs, data, t_start, weights, partial: bool) -> dict:
    skip = ("out", "prev_runtime_s", "prev_commands", "prev_processes", "work", "argv")
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    cfg["command"] = "python benchmarks/da.py " + " ".join(args.argv)
    cfg["commands"] = list(getattr(args, "prev_commands", [])) + [cfg["command"]]
    if getattr(args, "prev_processes", 1) > 1:  # appended to a merged file: its processes and this one
        cfg["processes"] = args.prev_processes + 1
    cfg["classes"] = data["classes"]
    cfg["reward_class_weights"] = weights
    cfg["frames"] = data["frames"]
    cfg["budgets"] = [data["budget"]]
    cfg["split"] = data["split"]
    cfg["machine"] = machine_info()
    result = {"runs": runs, "summary": summarize(runs), "config": cfg,
              "runtime_s": round(time.perf_counter() - t_start + getattr(args, "prev_runtime_s", 0.0), 1),
              "complete": not partial}
    _write(args.out, result, None if partial else args.plot)  # the plot once, at the end
    return result


def merge(paths: list[str], out: str, plot: str | None = None) -> dict:
    """Combine result files of one pair that differ only in their seeds, label budgets, methods or
    lr grids (e.g. seeds split over parallel processes) into one result: runs pooled, commands
    listed, runtimes added up."""
    target = Path(out).with_suffix(".json").resolve()
    if any(Path(p).with_suffix(".json").resolve() == target for p in paths):
        raise SystemExit(f"--merge: --out {out} is one of the files to merge; it is left as it is. Copy it "
                         "aside and merge the copy, or write the merge elsewhere")
    results = [read_result(p, "--merge") for p in paths]
    ignore = {"seeds", "command", "commands", "methods", "protocols", "append", "threads", "device", "lrs",
              "source_lrs", "uda_lrs", "semi_lrs", "lrs_from", "lrs_budget", "plot", "order", "budget", "budgets", "machine",
              "write_split", "skip_runs_in",
              "processes", "frames", "reward_class_weights", "num_classes"}

    def settings(cfg):  # the tune frames vary with the budget; the selection and evaluation roles may not
        out = {k: v for k, v in cfg.items() if k not in ignore and v is not None}  # None: not set
        if isinstance(out.get("split"), dict):
            out["split"] = {k: v for k, v in out["split"].items() if k != "tune"}
        return out
    base = settings(results[0]["config"])
    # the runs of one seed are paired: from two CPUs (vector instructions) or torch builds they
    # would pair different start models. Files written before the capability was recorded can't tell.
    machines = {(m.get("torch"), m["cpu_capability"]): p for p, res in zip(paths, results)
                for m in [res["config"].get("machine") or {}] if m.get("cpu_capability")}
    if len(machines) > 1:
        raise SystemExit("--merge: these files ran on different machines (torch, CPU capability): "
                         + "; ".join(f"{p}: {k}" for k, p in machines.items())
                         + ". The same seed's start models differ between them; keep them in separate files")
    runs: dict[tuple, dict] = {}
    seen_in: dict[tuple, str] = {}
    for path, res in zip(paths, results):
        other = settings(res["config"])
        # a setting only one file has is an option added after the other file was written
        diff = sorted(k for k in set(base) & set(other) if base[k] != other[k])
        if diff:
            raise SystemExit(f"{path}: settings differ from {paths[0]} in {diff}; only seeds, budgets, methods and "
                             "lr grids may differ")
        for r in res["runs"]:
            key = run_key(r)
            had = runs.setdefault(key, r)
            first = seen_in.setdefault(key, path)
            # a run both files hold must agree: if not, they trained different models for one seed
            # (another CPU or float order), and pairing across them would be wrong
            if any(had[k] != r[k] for k in ("target_mIoU", "select_mIoU", "source_mIoU")):
                raise SystemExit(f"--merge: {first} and {path} both hold {key} with other scores (target "
                                 f"{had['target_mIoU']} vs {r['target_mIoU']}): different models of that seed "
                                 "(another machine or float order); keep them apart")
    cfg = dict(results[0]["config"])
    cfg["frames"] = dict(cfg.get("frames", {}))
    for res in results[1:]:  # options and frame roles that only later files have (e.g. semi's)
        for k, v in res["config"].items():
            cfg.setdefault(k, v)
        for k, v in res["config"].get("frames", {}).items():
            cfg["frames"].setdefault(k, v)
    cfg["budgets"] = sorted({b for res in results for b in res["config"].get("budgets", [None]) if b is not None})
    cfg["seeds"] = sorted({r["seed"] for r in runs.values()})
    cfg["lrs"] = sorted({float(v) for res in results for v in res["config"]["lrs"]})
    cfg["commands"] = [c for res in results for c in res["config"]["commands"]]
    cfg["processes"] = sum(int(res["config"].get("processes") or 1) for res in results)  # merged files count theirs
    result = {"runs": list(runs.values()), "summary": summarize(list(runs.values())), "config": cfg,
              "runtime_s": round(sum(r["runtime_s"] for r in results), 1),
              "complete": all(r["complete"] for r in results)}
    _write(out, result, plot)
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", default="camvid_dusk", choices=PAIRS, help="the domain pair (see the module doc)")
    p.add_argument("--root", default="../shared/data/camvid", help="CamVid folder (train/, trainannot/, val/, ...)")
    p.add_argument("--idd-root", default="../shared/data/idd_lite", help="IDD Lite folder (camvid_idd)")
    p.add_argument("--budget", type=int, default=64, help="camvid_idd: labelled target frames (e.g. 16, 64, 256)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="camvid_idd: seed of the one split of IDD Lite's sequences into roles (not the run seed)")
    p.add_argument("--write-split", default=None, metavar="DIR",
                   help="camvid_idd: write the frame lists of the roles to DIR (one name a line) and exit")
    p.add_argument("--eval-frames", type=int, default=700, help="camvid_idd: at least this many evaluation frames")
    p.add_argument("--select-frames", type=int, default=300, help="camvid_idd: at least this many selection frames")
    p.add_argument("--eval-root", default=None,
                   help="score the target on this folder of the target's layout instead (tuning unchanged)")
    p.add_argument("--eval-split", default="test", help="split of --eval-root (camvid_dusk: of --root) to score")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS[:3]), choices=PROTOCOLS,
                   help="default: after_ce from_source uda (semi needs target frames without labels: camvid_idd)")
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
    p.add_argument("--semi-lrs", nargs="+", type=float, default=None, help="lr grid of semi (default --lrs)")
    p.add_argument("--order", default="lr", choices=["lr", "method"],
                   help="per seed: all methods at one lr, then the next lr (lr), or each method's whole grid in turn")
    p.add_argument("--lrs-from", default=None, metavar="RESULT",
                   help="run each method only at the lrs chosen in this result file (its own and its +cal pipeline's)")
    p.add_argument("--lrs-budget", type=int, default=None,
                   help="with --lrs-from: take the lrs chosen at this label budget (e.g. chosen at 64, reused at 16)")
    p.add_argument("--skip-runs-in", nargs="+", default=None, metavar="RESULT",
                   help="do not run again what these result files hold (same pair, budget, protocol, method, seed, "
                        "lr); e.g. a grid extended over a merged result; --merge pools them afterwards")
    p.add_argument("--steps", "--extra-steps", dest="extra_steps", type=int, default=200,
                   help="after_ce budget of every method (steps)")
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--uda-steps", type=int, default=200)
    p.add_argument("--semi-steps", type=int, default=200)
    p.add_argument("--semi-labelled", type=float, default=0.5,
                   help="semi: the share of the training set the (repeated) tune frames make up")
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
    p.add_argument("--out", default="results/da", help="output path without suffix (.json and .md)")
    p.add_argument("--plot", default=None, help="save the lr curves here (PNG): at the end of a run, or by --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULT",
                   help="only combine these result files (runs that differ in seeds, methods or lr grids) into "
                        "--out; trains nothing")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < args.semi_labelled < 1:
        p.error(f"--semi-labelled {args.semi_labelled}: the labelled share must lie between 0 and 1")
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
    elif _args.write_split:
        write_split(_args, _args.write_split)
    else:
        run(_args)
