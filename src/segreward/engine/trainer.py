"""The trainer, top to bottom: set-up, (resume), loop, eval, checkpoint.

One function, :func:`train`, runs one stage (``pretrain``: cross-entropy; ``tune``: a reward
loss) from a :class:`~segreward.engine.config.Config`. The same code runs on one CPU and on
many GPUs under ``torchrun`` (DDP). A run is a directory::

    <work_dir>/config.yaml               the resolved config
    <work_dir>/checkpoints/last.pt       model, optimiser, scheduler, RNG states, step (atomic)
    <work_dir>/model.safetensors         final weights (+ model_meta.json)
    <work_dir>/vis_data/scalars.json     mmengine-format log (train and val lines)

Datasets come from the config (``data.train``, ``data.val``) or, for code that decodes its data
once and trains many times (a benchmark), from ``train(cfg, datasets={"train": ..., "val": ...})``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segreward.engine import distributed as D
from segreward.engine.distributed import check_device
from segreward.engine.builders import (autocast, build_data, build_loss, build_optimizer, build_scheduler, dataset_info,
                                       resize_logits)
from segreward.engine.evaluation import evaluate  # noqa: F401  (re-exported: segreward.engine.evaluate)
from segreward.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from segreward.engine.config import Config
from segreward.errors import SegrewardError


class _GlobalBatches(torch.utils.data.Sampler):
    """Micro-batches of this rank for iterations ``start..iters``, fixed by (seed, iteration).

    Global batch ``i`` is positions ``[i*B, (i+1)*B)`` of an endless chain of per-epoch
    permutations (epoch ``e`` shuffled with seed ``seed + e``); rank ``r`` takes every
    ``world``-th index of it, split into ``accumulate`` micro-batches. The order depends on
    nothing but the iteration number, so a resumed run sees exactly the data it would have seen.
    """

    def __init__(self, n: int, batch: int, start: int, iters: int, seed: int, rank: int, world: int, accumulate: int):
        self.n, self.batch, self.start, self.iters = n, batch, start, iters
        self.seed, self.rank, self.world, self.accumulate = seed, rank, world, accumulate
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def global_batch(self, i: int) -> list[int]:
        out = []
        for pos in range(i * self.batch, (i + 1) * self.batch):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def __iter__(self):
        for i in range(self.start, self.iters):
            mine = self.global_batch(i)[self.rank::self.world]
            m = len(mine) // self.accumulate
            for a in range(self.accumulate):
                yield mine[a * m:(a + 1) * m]

    def __len__(self) -> int:
        return (self.iters - self.start) * self.accumulate


def build_transform(cfg: Config):
    if not cfg.train.augment:
        return None
    from segreward.data import transforms as T
    steps = [T.RandomFlip()]
    if cfg.train.crop:
        steps.insert(0, T.RandomCrop(tuple(cfg.train.crop)))
    return T.Compose(steps)


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, x: torch.Tensor, size, threshold: float, ignore_index: int = 255) -> torch.Tensor:
    """The teacher's argmax where its softmax confidence reaches ``threshold``, else ``ignore_index``."""
    logits = resize_logits(teacher(x).float(), size)
    conf, label = torch.softmax(logits, dim=1).max(dim=1)
    return torch.where(conf >= threshold, label, torch.full_like(label, ignore_index))


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || current) per pixel, averaged over pixels (labelled or not): the trust
    region of ``loss.kl_weight`` around the starting model. ``sum_c p_ref (log p_ref - log p)``."""
    ref = F.log_softmax(ref_logits.float(), dim=1)
    return (ref.exp() * (ref - F.log_softmax(logits.float(), dim=1))).sum(1).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        else:
            t.copy_(s)


def _load_start_weights(model: nn.Module, path: str, num_classes: int, strict: bool = True) -> None:
    from segreward.models import load_weights
    load_weights(model, path, strict=strict)


def train(cfg: Config, resume: bool = False, datasets: dict | None = None, overwrite: bool = False,
          inputs=()) -> dict:
    """Run one stage; returns ``{"work_dir", "step", "val": {name: scores}, "num_classes", "classes"}``.

    ``datasets``: ``{"train": Dataset, "val": {name: Dataset}}``, either part optional; a given
    part replaces ``cfg.data.train`` / ``cfg.data.val``. A training set that has
    ``with_transform`` (:class:`~segreward.data.memory.InMemoryDataset`) gets the trainer's
    augmentation (``train.augment``); any other dataset is used as it is. Under DDP every rank
    passes its own (equal) datasets; ``resume=True`` needs the same datasets again.

    A work_dir that already holds a run is never reused silently: ``resume=True`` continues it
    from its last checkpoint, ``overwrite=True`` removes the old run's files and starts again;
    otherwise the run is refused. Nothing is written before the config, the data, the model and
    the checkpoint to resume have been checked. No file the run reads (``inputs``: the config
    file(s) ``cfg`` came from; ``model.checkpoint``; class-weight files) is removed or rewritten.

    ``resume=True`` with a config that differs from the checkpoint's: settings that only change
    what is logged or when (``train.eval_every``, ``data.val``, ``calibrate``, ...) are applied
    and recorded in config.yaml, with one line saying so; any other change is refused.
    """
    if resume and overwrite:
        raise SegrewardError("--resume and --overwrite contradict each other; pass one of them")
    check_device(cfg.train.device)
    info = D.setup(cfg.train.device)
    try:
        return _train(cfg, resume, info, datasets, overwrite, inputs)
    finally:
        D.teardown()


def _build_datasets(cfg: Config, given: dict | None) -> tuple[Dataset, dict]:
    given = dict(given or {})
    unknown = sorted(set(given) - {"train", "val"})
    if unknown:
        raise SegrewardError(f"train(datasets=...): unknown keys {unknown}; give 'train' and/or 'val'")
    transform = build_transform(cfg)
    train_set = given.get("train")
    if train_set is None:
        train_set = build_data(cfg.data.train, transform)
    elif transform is not None and hasattr(train_set, "with_transform"):
        train_set = train_set.with_transform(transform)
    val = given.get("val")
    if val is None:
        val_sets = {name: build_data(spec) for name, spec in cfg.data.val.items()}
    elif isinstance(val, dict):
        val_sets = dict(val)
    else:
        raise SegrewardError(f"train(datasets=...): 'val' must map names to datasets, got {type(val).__name__}")
    if len(train_set) == 0:
        raise SegrewardError("the training dataset is empty")
    return train_set, val_sets


def _snapshot(cfg: Config, given: dict | None) -> dict:
    """The config as written to config.yaml and checkpoints; datasets passed to train() are
    recorded by type and size (they have no spec to rebuild them from)."""
    out = cfg.to_dict()
    given = given or {}
    if given.get("train") is not None:
        out["data"]["train"] = {"type": f"given ({type(given['train']).__name__})", "n": len(given["train"])}
    if given.get("val") is not None:
        out["data"]["val"] = {k: {"type": f"given ({type(v).__name__})", "n": len(v)} for k, v in given["val"].items()}
    return out


# Files and folders of a run in its work_dir: what --overwrite removes, and what makes a folder
# "hold a run" that is never reused silently.
RUN_FILES = ("config.yaml", "checkpoints", "model.safetensors", "model_meta.json", "summary.json", "vis_data",
             "offsets.json", "model_calibrated.safetensors", "calibrated")


def existing_run(work: Path) -> list[str]:
    """The run files already in ``work`` (empty: the folder is free to use)."""
    return [name for name in RUN_FILES if (work / name).exists() or (work / name).is_symlink()]


def _inside(path: Path, top: Path) -> bool:
    path, top = path.resolve(), top.resolve()
    return path == top or top in path.parents


def prepare_run_dir(work: Path, resume: bool, overwrite: bool, inputs=(), snapshot: str | None = None) -> bool:
    """Check (and with ``overwrite`` clear) the run folder before anything is written; returns
    whether the run continues from ``checkpoints/last.pt``. A one-line error names the folder
    and the choices when it holds a run that is neither resumed nor to be replaced.

    ``inputs``: ``(what, path)`` of the files this run reads (the config file, model.checkpoint,
    class weights): ``--overwrite`` refuses to remove any of them, and the run refuses to replace
    its config.yaml when that is an input and ``snapshot`` (the text to write) differs."""
    import shutil
    from segreward.outputs import ensure_dir, same_file

    if work.exists() and not work.is_dir():
        raise SegrewardError(f"work_dir {work}: is a file, not a folder; choose another --work-dir")
    found = existing_run(work)
    ckpt = work / "checkpoints" / "last.pt"
    resuming = resume and ckpt.exists()
    if found and not overwrite and not resuming:
        if resume:
            raise SegrewardError(f"work_dir {work}: holds a run ({', '.join(found)}) but no checkpoint to resume "
                                 f"from ({ckpt}); pass --overwrite to start it again, or choose another --work-dir")
        raise SegrewardError(f"work_dir {work}: already holds a run ({', '.join(found)}); pass --resume to continue "
                             "it, --overwrite to replace it, or choose another --work-dir")
    config = work / "config.yaml"
    for what, src in inputs:
        if not Path(src).exists():
            continue
        if same_file(src, config):
            if config.read_text(errors="replace") == snapshot:
                continue  # written again with the very same text (and kept by --overwrite)
            raise SegrewardError(f"work_dir {work}: this run would replace {src}, which it reads ({what}), with the "
                                 "resolved config; copy the file out of the run folder first, or choose another "
                                 "--work-dir")
        hit = next((n for n in found if _inside(Path(src), work / n)), None)
        if hit is not None and not resuming:
            raise SegrewardError(f"work_dir {work}: --overwrite would remove {src}, which this run reads ({what}); "
                                 "copy it out of the run folder first, or choose another --work-dir")
    if resuming:
        ensure_dir(work, "work_dir")
        return True
    if resume:
        print(f"segreward: note: --resume: no checkpoint at {ckpt}; starting from scratch", file=sys.stderr)
    ensure_dir(work, "work_dir")
    for name in found:  # overwrite: the old run's files go first, so nothing of it mixes with the new one
        path = work / name
        if name == "config.yaml" and any(same_file(src, path) for _, src in inputs):
            continue  # an input with the very text about to be written (checked above)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return False


# Settings a resumed run may change: they decide what is logged or evaluated, and when, not the
# trajectory of the weights. Any other change would train on with a mix of two configs.
RESUME_MAY_CHANGE = ("name", "work_dir", "data.val", "calibrate", "train.progress", "train.tensorboard",
                     "train.log_every", "train.eval_every", "train.checkpoint_every", "train.num_workers",
                     "train.device")


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def resume_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """``(applied, refused)``: the settings (``key: old -> new``) in which the config ``now``
    differs from the checkpoint's config ``saved``. ``train.iters`` may change under a constant
    schedule only (poly and cosine decay over it)."""
    old, new = _flat(saved), _flat(now)
    applied, refused = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            continue
        ok = any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
        if key == "train.iters":
            ok = now.get("optim", {}).get("schedule") == "constant"
        (applied if ok else refused).append(f"{key}: {a} -> {b}")
    return applied, refused


class _Stage:
    """One stage of training, in the order it runs: :meth:`setup` (data, model, loss, optimiser;
    nothing written), :meth:`restore` (resume or seed), :meth:`open_run_dir` (the first write),
    :meth:`run` (the step loop with evaluation and checkpoints), :meth:`finish` (the end of the
    stage: final weights and summary)."""

    def __init__(self, cfg: Config, info: D.DistInfo, datasets: dict | None, inputs=()):
        self.cfg, self.info, self.given = cfg, info, datasets
        files = [("model.checkpoint", cfg.model.checkpoint), ("loss.class_weight", cfg.loss.class_weight),
                 ("loss.reward_class_weight", cfg.loss.reward_class_weight),
                 ("calibrate.reward_class_weight", cfg.calibrate.reward_class_weight)]
        self.inputs = [("the config file", str(p)) for p in inputs] + [(w, p) for w, p in files if isinstance(p, str)]
        self.tc = cfg.train
        self.work = Path(cfg.work_dir)
        self.ckpt_path = self.work / "checkpoints" / "last.pt"
        self.writer = None
        self.teacher = None
        self.results: dict = {}
        self.start = 0

    # --- set-up: everything that can fail on the config or the data, before any write ---
    def setup(self) -> None:
        cfg, tc, info = self.cfg, self.tc, self.info
        if tc.amp == "fp16" and info.device.type != "cuda":
            raise SegrewardError("train.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
        if tc.batch_size % (info.world_size * tc.accumulate):
            raise SegrewardError(f"train.batch_size={tc.batch_size} must be divisible by world size ({info.world_size}) "
                                 f"x train.accumulate ({tc.accumulate})")
        torch.manual_seed(cfg.seed)
        self.train_set, self.val_sets = _build_datasets(cfg, self.given)
        self.snapshot = _snapshot(cfg, self.given)
        self.snapshot_text = yaml.safe_dump(self.snapshot, sort_keys=False)
        self.num_classes, self.ignore_index, self.classes = dataset_info(self.train_set)
        if cfg.model.num_classes is not None and cfg.model.num_classes != self.num_classes:
            raise SegrewardError(f"model.num_classes={cfg.model.num_classes} but the training data has "
                                 f"{self.num_classes} classes")
        from segreward.models import build_model
        model = build_model(cfg.model.name, self.num_classes, **cfg.model.options)
        if cfg.model.checkpoint:
            _load_start_weights(model, cfg.model.checkpoint, self.num_classes, strict=cfg.model.checkpoint_strict)
        model.to(info.device)
        self.model = model
        # The starting model, frozen: the anchor of loss.kl_weight. Copied before a resume loads the
        # run's weights; the checkpoint keeps it too, so a resumed run uses the very same anchor.
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.loss.kl_weight > 0 else None
        self.loss_fn, self.loss_name = build_loss(cfg, self.num_classes, self.ignore_index)
        self.loss_fn.to(info.device)
        self.net = (DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
                    if info.enabled else model)
        self.optimizer = build_optimizer(model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.iters)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")
        self.calibration_set = self._calibration_set() if cfg.calibrate.enabled else None

    def _calibration_set(self) -> Dataset:
        """The labelled set of the ``calibrate`` step, checked before anything is written."""
        cal = self.cfg.calibrate
        from segreward.calibrate.search import check_count_form
        from segreward.engine.builders import read_class_weight
        self.calibration_weights = read_class_weight(cal.reward_class_weight, self.num_classes)
        check_count_form(cal.reward, self.num_classes, self.calibration_weights)
        if isinstance(cal.data, dict):
            ds = build_data(cal.data)
        elif cal.data == "train":
            if self.cfg.pseudo_label.enabled and not self.cfg.pseudo_label.only_unlabelled:
                raise SegrewardError("calibrate.data=train: a pseudo-label run does not use its training labels; "
                                     "name a labelled data.val set or give a dataset spec")
            given = (self.given or {}).get("train")
            ds = given if given is not None else build_data(self.cfg.data.train)  # no augmentation
        elif cal.data in self.val_sets:
            ds = self.val_sets[cal.data]
        else:
            raise SegrewardError(f"calibrate.data = {cal.data!r}: no such set; use train, one of data.val "
                                 f"({', '.join(self.val_sets) or 'none'}) or a dataset spec")
        if dataset_info(ds)[0] != self.num_classes:
            raise SegrewardError(f"calibrate.data has {dataset_info(ds)[0]} classes, the model {self.num_classes}")
        # What offsets.json records as the data it was fitted on.
        named = not isinstance(cal.data, dict)
        data = self.snapshot["data"]  # given datasets are recorded there by type and size
        spec = (data["train"] if cal.data == "train" else data["val"].get(cal.data)) if named else cal.data
        self.calibration_info = {"path": str(self.work / "config.yaml"), "kind": "run config" if named else "dataset spec",
                                 **({"set": cal.data} if named else {}),
                                 "spec": dict(spec) if isinstance(spec, dict) else None, "images": len(ds)}
        return ds

    # --- resume (or a fresh start) ---
    def restore(self, resume: bool) -> None:
        state = None
        if resume and self.ckpt_path.exists():
            state = load_checkpoint(self.ckpt_path)
            self._check_config(state.get("config"))
            self._load_state(state)
            self.start = int(state["step"])
            rng = state["rng"]
            set_rng_state(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        else:
            # samples differ by rank; the model does not (DDP syncs it)
            torch.manual_seed(self.cfg.seed + 1000 * self.info.rank)
        finished = (self.work / "summary.json").exists() and (self.work / "model.safetensors").exists()
        if self.start > self.tc.iters or (self.start == self.tc.iters and finished):
            weights = self.work / "model.safetensors"
            how = ("raise train.iters to continue it" if self.cfg.optim.schedule == "constant" else
                   f"start a new run from its weights (model.checkpoint={weights}, another --work-dir): train.iters "
                   f"cannot grow under optim.schedule={self.cfg.optim.schedule}, which decays over it")
            raise SegrewardError(f"{self.ckpt_path}: this run already finished ({self.start} of {self.tc.iters} "
                                 f"iterations); {how}")
        if self.cfg.pseudo_label.enabled:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            if state is not None and "teacher" in state:
                self.teacher.load_state_dict(state["teacher"])

    def _check_config(self, saved) -> None:
        """Refuse a resume whose config changes the training (lr, data, seed, size, schedule
        length, ...); apply, and say so in one line, changes of what is logged or evaluated."""
        if not isinstance(saved, dict):
            return
        applied, refused = resume_changes(saved, self.snapshot)
        if refused:
            extra = " (poly and cosine schedules decay over train.iters)" if any(
                r.startswith("train.iters:") for r in refused) else ""
            raise SegrewardError(f"{self.ckpt_path}: --resume with a changed config would train on with a mix of two "
                                 f"runs: {'; '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}{extra}; resume "
                                 "with the run's config (its config.yaml), or start a new run (--overwrite or another "
                                 "--work-dir)")
        if applied and self.info.is_main:
            print(f"segreward: note: --resume applies and records in config.yaml: {'; '.join(applied)}",
                  file=sys.stderr)

    def _load_state(self, state: dict) -> None:
        """Load a checkpoint of this run; a model of another shape is one line naming the keys."""
        where = self.ckpt_path
        own = self.model.state_dict()
        saved = state.get("model", {})
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        shapes = [k for k in sorted(set(own) & set(saved)) if tuple(own[k].shape) != tuple(saved[k].shape)]
        if missing or unexpected or shapes:
            parts = [f"{len(v)} {n} (e.g. {', '.join(v[:3])})" for n, v in
                     (("missing keys", missing), ("unexpected keys", unexpected)) if v]
            if shapes:
                k = shapes[0]
                parts.append(f"{len(shapes)} keys with other shapes (e.g. {k}: checkpoint {tuple(saved[k].shape)}, "
                             f"model {tuple(own[k].shape)})")
            raise SegrewardError(f"{where}: --resume with another model: {'; '.join(parts)}; resume with the "
                                 "config the run was started with, or start a new run (another --work-dir)")
        try:
            self.model.load_state_dict(saved)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if "loss" in state:
                self.loss_fn.load_state_dict(state["loss"], strict=False)
            if self.reference is not None and "reference" in state:
                self.reference.load_state_dict(state["reference"])
        except (KeyError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SegrewardError(f"{where}: cannot resume from this checkpoint ({first}); resume with the config "
                                 "the run was started with, or start a new run (another --work-dir)") from None

    # --- the first write: the run folder, config.yaml, the log ---
    def open_run_dir(self, resume: bool, overwrite: bool) -> None:
        info = self.info
        error = None
        if info.is_main:
            try:
                prepare_run_dir(self.work, resume, overwrite, self.inputs, self.snapshot_text)
            except SegrewardError as e:
                error = e
        if D.broadcast_flag(error is not None, info):
            raise error or SegrewardError(f"work_dir {self.work}: refused by the main process (see its message)")
        if info.is_main:
            from segreward.outputs import atomic_write_text
            from segreward.runlog import RunWriter
            self._created = [n for n in ("config.yaml", "vis_data") if not (self.work / n).exists()]
            config = self.work / "config.yaml"
            if not (config.is_file() and config.read_text(errors="replace") == self.snapshot_text):
                atomic_write_text(config, self.snapshot_text)
            self.writer = RunWriter(self.work, tensorboard=self.tc.tensorboard)

    def discard_if_empty(self) -> None:
        """After a failure: remove what this run created if it logged nothing and saved no
        checkpoint (a folder with only config.yaml and an empty log is not a run)."""
        import shutil
        if not self.info.is_main or self.ckpt_path.exists():
            return
        log = self.work / "vis_data" / "scalars.json"
        if log.exists() and log.stat().st_size > 0:
            return
        for name in getattr(self, "_created", ()):
            path = self.work / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --- checkpoints and evaluation ---
    def save_checkpoint(self, step: int) -> None:
        info = self.info
        states = [rng_state()]
        if info.enabled:  # every rank's RNG, so a resumed DDP run draws the same samples
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if info.is_main:
            atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(), "step": step,
                         "rng": states, "config": self.snapshot,
                         **({"teacher": self.teacher.state_dict()} if self.teacher is not None else {}),
                         **({"reference": self.reference.state_dict()} if self.reference is not None else {}),
                         "meta": {"num_classes": self.num_classes, "classes": self.classes}}, self.ckpt_path)

    def run_eval(self, step: int) -> dict:
        eval_batch = max(1, self.tc.batch_size // self.info.world_size)
        results = {}
        for name, ds in self.val_sets.items():
            results[name] = evaluate(self.model, ds, self.num_classes, self.ignore_index, batch_size=eval_batch,
                                     info=self.info, amp=self.tc.amp)
        if self.writer is not None:
            line = {}
            for j, (name, s) in enumerate(results.items()):
                prefix = "" if j == 0 else f"{name}/"
                line.update({f"{prefix}{k}": round(s[k], 4) for k in ("aAcc", "mIoU", "mAcc", "mDice")})
            self.writer.log(step, line, mode="val")
        return results

    # --- one optimisation step ---
    def train_step(self, batches) -> dict:
        """One iteration (``train.accumulate`` micro-batches); returns the detached totals."""
        cfg, tc, info = self.cfg, self.tc, self.info
        zero = lambda: torch.zeros((), device=info.device)  # noqa: E731
        out = {"total": zero(), "base": zero(), "kl": zero(), "labelled": zero(), "data_time": 0.0}
        for micro in range(tc.accumulate):
            t0 = time.perf_counter()
            x, y = next(batches)
            out["data_time"] += time.perf_counter() - t0
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            if self.teacher is not None:
                y = self._pseudo(x, y)
            out["labelled"] += (y != self.ignore_index).sum()
            last_micro = micro == tc.accumulate - 1
            # Only the last micro-step all-reduces gradients (require_backward_grad_sync).
            sync = self.net.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
            with sync:
                with autocast(info.device, tc.amp):
                    logits = self.net(x)
                loss = self.loss_fn(logits.float(), y)
                out["base"] += loss.detach() / tc.accumulate
                if self.reference is not None:
                    with torch.no_grad(), autocast(info.device, tc.amp):
                        ref_logits = self.reference(x)
                    kl = kl_to_reference(logits, ref_logits)
                    out["kl"] += kl.detach() / tc.accumulate
                    loss = loss + cfg.loss.kl_weight * kl
                loss = loss / tc.accumulate
                self.scaler.scale(loss).backward()
            out["total"] += loss.detach()
        out["y"] = y
        return out

    def _pseudo(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The teacher's pseudo-labels for the batch; with ``pseudo_label.only_unlabelled`` only for
        the frames without a labelled pixel (the others keep their labels: semi-supervised)."""
        pl = self.cfg.pseudo_label
        if not pl.only_unlabelled:
            return pseudo_labels(self.teacher, x, y.shape[-2:], pl.threshold, self.ignore_index)
        bare = ~(y != self.ignore_index).flatten(1).any(1)
        if not bare.any():
            return y
        y = y.clone()
        y[bare] = pseudo_labels(self.teacher, x[bare], y.shape[-2:], pl.threshold, self.ignore_index)
        return y

    def _non_finite(self, step: int, out: dict) -> SegrewardError:
        kept = (f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists()
                else "no checkpoint was written yet")
        total = float(out["total"])
        if int(out["labelled"]) == 0:
            why = (f"every pseudo-label is below pseudo_label.threshold={self.cfg.pseudo_label.threshold}"
                   if self.teacher is not None else f"every label is the ignore index {self.ignore_index}")
            return SegrewardError(f"the loss became {total} at iteration {step + 1}: no pixel of the batch has a "
                                  f"label ({why}); the run stopped and {kept}. Check the data"
                                  + (" or lower pseudo_label.threshold" if self.teacher is not None else ""))
        return SegrewardError(f"the loss became {total} at iteration {step + 1}; the run stopped and {kept}. "
                              "Lower optim.lr, set optim.grad_clip, or check the data")

    def _optimizer_step(self) -> float:
        cfg = self.cfg
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None and cfg.pseudo_label.teacher == "ema":
            ema_update(self.teacher, self.model, cfg.pseudo_label.ema_momentum)
        return lr

    def _log_train(self, done: int, out: dict, lr: float, since: tuple[float, int], data_time: float) -> None:
        t_last, last_logged = since
        now = time.perf_counter()
        n_iters = done - last_logged
        total = float(out["total"])
        line = {"lr": lr, "data_time": data_time / n_iters, "loss": total, self.loss_name: float(out["base"])}
        line.update(getattr(self.loss_fn, "diagnostics", {}))
        if self.reference is not None:
            line["kl"] = float(out["kl"])
        if self.teacher is not None:
            line["pseudo_fraction"] = float((out["y"] != self.ignore_index).float().mean())
        line["time"] = (now - t_last) / n_iters
        if self.info.device.type == "cuda":
            line["memory"] = int(torch.cuda.max_memory_allocated() // 2**20)
        self.writer.log(done, line, mode="train")

    # --- the step loop ---
    def run(self) -> None:
        cfg, tc, info = self.cfg, self.tc, self.info
        sampler = _GlobalBatches(len(self.train_set), tc.batch_size, self.start, tc.iters, cfg.seed, info.rank,
                                 info.world_size, tc.accumulate)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=tc.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
        batches = iter(loader)
        bar = tqdm(total=tc.iters, initial=self.start, desc=f"{cfg.name} [{cfg.stage}]",
                   disable=not (info.is_main and tc.progress), dynamic_ncols=True)
        since, data_time = (time.perf_counter(), self.start), 0.0
        self.model.train()
        try:
            for step in range(self.start, tc.iters):
                out = self.train_step(batches)
                data_time += out["data_time"]
                if D.broadcast_flag(not bool(torch.isfinite(out["total"])), info):
                    raise self._non_finite(step, out)
                lr = self._optimizer_step()
                done = step + 1
                bar.update(1)
                if self.writer is not None and (done % tc.log_every == 0 or done == tc.iters):
                    self._log_train(done, out, lr, since, data_time)
                    since, data_time = (time.perf_counter(), done), 0.0
                    bar.set_postfix(loss=f"{float(out['total']):.4f}", refresh=False)
                evaluate_now = done % tc.eval_every == 0 or done == tc.iters
                checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.iters
                if evaluate_now or checkpoint_now:
                    self._check_weights(done)  # never save or score a model full of NaN
                if checkpoint_now:  # before the evaluation, so a failing one costs no step
                    self.save_checkpoint(done)
                if evaluate_now:
                    self._evaluate(done, saved=checkpoint_now)
                    first = next(iter(self.results.values()), None)
                    if first is not None:
                        bar.set_postfix(loss=f"{float(out['total']):.4f}", mIoU=f"{first['mIoU']:.2f}", refresh=False)
            if self.start == tc.iters:  # resumed after its last step: the final evaluation had failed
                self._evaluate(tc.iters, saved=True)
        finally:
            bar.close()

    def _evaluate(self, done: int, saved: bool) -> None:
        """The evaluation at step ``done``; if it fails, the steps since the last checkpoint are
        saved first (a failure never costs work a checkpoint can keep)."""
        try:
            self.results = self.run_eval(done)
        except Exception:
            if not saved:
                self.save_checkpoint(done)
            raise

    def _check_weights(self, done: int) -> None:
        bad = [n for n, p in self.model.state_dict().items()
               if p.dtype.is_floating_point and not bool(torch.isfinite(p).all())]
        if D.broadcast_flag(bool(bad), self.info):
            kept = (f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists()
                    else "no checkpoint was written yet")
            raise SegrewardError(f"the model's weights became NaN or infinite at iteration {done} (e.g. "
                                 f"{bad[0] if bad else 'on another rank'}); the run stopped and {kept}. Lower optim.lr, "
                                 "set optim.grad_clip, or check the data")

    # --- the end of a stage: final weights and summary (a post-stage step goes after this) ---
    def finish(self) -> dict:
        cfg, tc = self.cfg, self.tc
        if self.info.is_main:
            from segreward.models import save_weights
            from segreward.outputs import atomic_write_text
            spec = dict(getattr(self.model, "segreward_spec", {}))
            save_weights(self.model, self.work / "model.safetensors",
                         meta={**spec, "classes": self.classes, "run": cfg.name, "stage": cfg.stage, "step": tc.iters})
            summary = {"step": tc.iters, "val": {k: {m: v[m] for m in ("aAcc", "mIoU", "mAcc", "mDice", "IoU")}
                                                 for k, v in self.results.items()}}
            atomic_write_text(self.work / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
        return {"work_dir": str(self.work), "step": tc.iters, "val": self.results, "num_classes": self.num_classes,
                "classes": self.classes}


    def calibrate(self) -> dict:
        """The ``calibrate`` step: fit offsets on the calibration set, fold them into a copy of the
        model, write ``offsets.json`` and ``model_calibrated.safetensors``, score the val sets."""
        cal_cfg, info = self.cfg.calibrate, self.info
        from segreward.calibrate.folding import fold_offsets
        from segreward.engine.calibration import calibrate_model, format_calibration, write_calibration
        mode = "streaming" if info.enabled else cal_cfg.mode  # exact mode would need every rank's logits
        cal = calibrate_model(self.model, self.calibration_set, reward=cal_cfg.reward, mode=mode,
                              kfold=cal_cfg.kfold or None, bound=cal_cfg.bound, max_sweeps=cal_cfg.max_sweeps,
                              bins=cal_cfg.bins, class_weights=self.calibration_weights,
                              batch_size=max(1, self.tc.batch_size // info.world_size), device=info.device,
                              rank=info.rank, world=info.world_size, progress=info.is_main and self.tc.progress)
        model = fold_offsets(copy.deepcopy(self.model), cal.offsets)
        scores = {name: evaluate(model, ds, self.num_classes, self.ignore_index,
                                 batch_size=max(1, self.tc.batch_size // info.world_size), info=info, amp=self.tc.amp)
                  for name, ds in self.val_sets.items()}
        if info.is_main:
            from segreward.outputs import atomic_write_text
            data = {**self.calibration_info, "labelled_pixels": cal.scores_before["pixels"]}
            write_calibration(self.work, model, cal, self.classes, source=str(self.work / "model.safetensors"),
                              weights_name="model_calibrated.safetensors", data=data)
            summary = json.loads((self.work / "summary.json").read_text())
            summary["calibration"] = {"data": data, "reward": cal.reward, "before": cal.reward_before,
                                      "after": cal.reward_after,
                                      "cv": cal.cv, "offsets": [float(v) for v in cal.offsets]}
            summary["val_calibrated"] = {k: {m: v[m] for m in ("aAcc", "mIoU", "mAcc", "mDice", "IoU")}
                                         for k, v in scores.items()}
            atomic_write_text(self.work / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
            if self.writer is not None:
                line = {"calibration/reward_before": cal.reward_before, "calibration/reward_after": cal.reward_after}
                for j, (name, sc) in enumerate(scores.items()):
                    prefix = "calibrated/" if j == 0 else f"calibrated/{name}/"
                    line.update({f"{prefix}{k}": round(sc[k], 4) for k in ("aAcc", "mIoU", "mAcc", "mDice")})
                self.writer.log(self.tc.iters, line, mode="val")
            if self.tc.progress:
                from segreward.engine.resolve import DataChoice
                print(format_calibration(cal, self.classes, data=DataChoice(None, data).describe()))
        return {"val_calibrated": scores, "calibration": cal}


def _train(cfg: Config, resume: bool, info: D.DistInfo, datasets: dict | None = None,
           overwrite: bool = False, inputs=()) -> dict:
    from segreward.outputs import created_mark, discard_empty_dirs
    mark = created_mark()
    stage = _Stage(cfg, info, datasets, inputs)
    stage.setup()
    stage.restore(resume)
    stage.open_run_dir(resume, overwrite)
    try:
        stage.run()
        result = stage.finish()
        if cfg.calibrate.enabled:
            result.update(stage.calibrate())
    except BaseException:
        stage.close()
        stage.discard_if_empty()
        if info.is_main:
            discard_empty_dirs(mark)  # a work_dir this run made and left empty
        raise
    stage.close()
    return result
