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
from segreward.engine.builders import (build_data, build_loss, build_optimizer, build_scheduler, dataset_info,
                                       resize_logits)
from segreward.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from segreward.engine.config import Config
from segreward.errors import SegrewardError
from segreward.metrics import SegMetric


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
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, ignore_index: int = 255,
             batch_size: int = 8, device: torch.device | str = "cpu", info: D.DistInfo | None = None,
             amp: str = "none") -> dict:
    """Dataset-level aAcc/mIoU/mAcc/mDice (percent) of the argmax prediction; under DDP each
    rank scores a shard and the confusion matrices are all-reduced."""
    info = info or D.DistInfo(device=torch.device(device))
    was_training = model.training
    model.eval()
    metric = SegMetric(num_classes, ignore_index)
    indices = list(range(info.rank, len(dataset), info.world_size))
    # Its own generator: a DataLoader draws a seed from the global RNG otherwise, and then how often
    # a run evaluates would change the random numbers (augmentation, samples) of its training.
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator())
    for x, y in loader:
        x, y = x.to(info.device), y.to(info.device)
        with _autocast(info.device, amp):
            logits = model(x)
        metric.update(resize_logits(logits.float(), y.shape[-2:]).argmax(1).cpu(), y.cpu())
    model.train(was_training)
    return metric.compute()


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


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _load_start_weights(model: nn.Module, path: str, num_classes: int) -> None:
    from segreward.models import load_weights
    load_weights(model, path)


def train(cfg: Config, resume: bool = False, datasets: dict | None = None) -> dict:
    """Run one stage; returns ``{"work_dir", "step", "val": {name: scores}, "num_classes", "classes"}``.

    ``datasets``: ``{"train": Dataset, "val": {name: Dataset}}``, either part optional; a given
    part replaces ``cfg.data.train`` / ``cfg.data.val``. A training set that has
    ``with_transform`` (:class:`~segreward.data.memory.InMemoryDataset`) gets the trainer's
    augmentation (``train.augment``); any other dataset is used as it is. Under DDP every rank
    passes its own (equal) datasets; ``resume=True`` needs the same datasets again.
    """
    info = D.setup(cfg.train.device)
    try:
        return _train(cfg, resume, info, datasets)
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


def _train(cfg: Config, resume: bool, info: D.DistInfo, datasets: dict | None = None) -> dict:
    tc = cfg.train
    if tc.amp == "fp16" and info.device.type != "cuda":
        raise SegrewardError("train.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
    if tc.batch_size % (info.world_size * tc.accumulate):
        raise SegrewardError(f"train.batch_size={tc.batch_size} must be divisible by world size ({info.world_size}) "
                             f"x train.accumulate ({tc.accumulate})")
    work = Path(cfg.work_dir)
    ckpt_path = work / "checkpoints" / "last.pt"

    # --- data, model, loss ---
    torch.manual_seed(cfg.seed)
    train_set, val_sets = _build_datasets(cfg, datasets)
    snapshot = _snapshot(cfg, datasets)
    num_classes, ignore_index, classes = dataset_info(train_set)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise SegrewardError(f"model.num_classes={cfg.model.num_classes} but the training data has {num_classes} classes")
    from segreward.models import build_model
    model = build_model(cfg.model.name, num_classes, **cfg.model.options)
    if cfg.model.checkpoint:
        _load_start_weights(model, cfg.model.checkpoint, num_classes)
    model.to(info.device)
    # The starting model, frozen: the anchor of loss.kl_weight. Copied before a resume loads the
    # run's weights; the checkpoint keeps it too, so a resumed run uses the very same anchor.
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.loss.kl_weight > 0 else None
    loss_fn, loss_name = build_loss(cfg, num_classes, ignore_index)
    loss_fn.to(info.device)
    net = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None) if info.enabled else model
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.iters)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")

    # --- resume ---
    start, state = 0, None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "loss" in state:
            loss_fn.load_state_dict(state["loss"], strict=False)
        if reference is not None and "reference" in state:
            reference.load_state_dict(state["reference"])
        start = int(state["step"])
        set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
    else:
        torch.manual_seed(cfg.seed + 1000 * info.rank)  # samples differ by rank; the model does not (DDP syncs it)
    if start >= tc.iters:
        raise SegrewardError(f"{ckpt_path}: this run already finished ({start} of {tc.iters} iterations); "
                             "raise train.iters to continue it")

    teacher = None
    if cfg.pseudo_label.enabled:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None and "teacher" in state:
            teacher.load_state_dict(state["teacher"])

    writer = None
    if info.is_main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
        from segreward.runlog import RunWriter
        writer = RunWriter(work, tensorboard=tc.tensorboard)

    sampler = _GlobalBatches(len(train_set), tc.batch_size, start, tc.iters, cfg.seed, info.rank,
                             info.world_size, tc.accumulate)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    batches = iter(loader)

    def save_checkpoint(step: int) -> None:
        states = [rng_state()]
        if info.enabled:  # every rank's RNG, so a resumed DDP run draws the same samples
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if info.is_main:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "step": step,
                         "rng": states, "config": snapshot,
                         **({"teacher": teacher.state_dict()} if teacher is not None else {}),
                         **({"reference": reference.state_dict()} if reference is not None else {}),
                         "meta": {"num_classes": num_classes, "classes": classes}}, ckpt_path)

    eval_batch = max(1, tc.batch_size // info.world_size)

    def run_eval(step: int) -> dict:
        results = {}
        for name, ds in val_sets.items():
            results[name] = evaluate(model, ds, num_classes, ignore_index, batch_size=eval_batch, info=info, amp=tc.amp)
        if writer is not None:
            line = {}
            for j, (name, s) in enumerate(results.items()):
                prefix = "" if j == 0 else f"{name}/"
                line.update({f"{prefix}{k}": round(s[k], 4) for k in ("aAcc", "mIoU", "mAcc", "mDice")})
            writer.log(step, line, mode="val")
        return results

    bar = tqdm(total=tc.iters, initial=start, desc=f"{cfg.name} [{cfg.stage}]", disable=not (info.is_main and tc.progress),
               dynamic_ncols=True)
    results: dict = {}
    t_last, last_logged = time.perf_counter(), start
    data_time = 0.0
    model.train()
    for step in range(start, tc.iters):
        total = torch.zeros((), device=info.device)
        base_total, kl_total = torch.zeros((), device=info.device), torch.zeros((), device=info.device)
        for micro in range(tc.accumulate):
            t0 = time.perf_counter()
            x, y = next(batches)
            data_time += time.perf_counter() - t0
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            if teacher is not None:
                y = pseudo_labels(teacher, x, y.shape[-2:], cfg.pseudo_label.threshold, ignore_index)
            last_micro = micro == tc.accumulate - 1
            # Only the last micro-step all-reduces gradients (require_backward_grad_sync).
            sync = net.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
            with sync:
                with _autocast(info.device, tc.amp):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                base_total += loss.detach() / tc.accumulate
                if reference is not None:
                    with torch.no_grad(), _autocast(info.device, tc.amp):
                        ref_logits = reference(x)
                    kl = kl_to_reference(logits, ref_logits)
                    kl_total += kl.detach() / tc.accumulate
                    loss = loss + cfg.loss.kl_weight * kl
                loss = loss / tc.accumulate
                scaler.scale(loss).backward()
            total += loss.detach()
        if D.broadcast_flag(not bool(torch.isfinite(total)), info):
            if writer is not None:
                writer.close()
            bar.close()
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise SegrewardError(f"the loss became {float(total)} at iteration {step + 1}; the run stopped and "
                                 f"{kept}. Lower optim.lr, set optim.grad_clip, or check the data")
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None and cfg.pseudo_label.teacher == "ema":
            ema_update(teacher, model, cfg.pseudo_label.ema_momentum)
        done = step + 1
        bar.update(1)

        if writer is not None and (done % tc.log_every == 0 or done == tc.iters):
            now = time.perf_counter()
            n_iters = done - last_logged
            line = {"lr": lr, "data_time": data_time / n_iters, "loss": float(total), loss_name: float(base_total)}
            line.update(getattr(loss_fn, "diagnostics", {}))
            if reference is not None:
                line["kl"] = float(kl_total)
            if teacher is not None:
                line["pseudo_fraction"] = float((y != ignore_index).float().mean())
            line["time"] = (now - t_last) / n_iters
            if info.device.type == "cuda":
                line["memory"] = int(torch.cuda.max_memory_allocated() // 2**20)
            writer.log(done, line, mode="train")
            t_last, last_logged, data_time = now, done, 0.0
            bar.set_postfix(loss=f"{float(total):.4f}", refresh=False)
        if done % tc.eval_every == 0 or done == tc.iters:
            results = run_eval(done)
            first = next(iter(results.values()), None)
            if first is not None:
                bar.set_postfix(loss=f"{float(total):.4f}", mIoU=f"{first['mIoU']:.2f}", refresh=False)
        if done % tc.checkpoint_every == 0 or done == tc.iters:
            save_checkpoint(done)
    bar.close()

    if info.is_main:
        from segreward.models import save_weights
        spec = dict(getattr(model, "segreward_spec", {}))
        save_weights(model, work / "model.safetensors", meta={**spec, "classes": classes, "run": cfg.name,
                                                              "stage": cfg.stage, "step": tc.iters})
        summary = {"step": tc.iters, "val": {k: {m: v[m] for m in ("aAcc", "mIoU", "mAcc", "mDice", "IoU")}
                                             for k, v in results.items()}}
        (work / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    if writer is not None:
        writer.close()
    return {"work_dir": str(work), "step": tc.iters, "val": results, "num_classes": num_classes, "classes": classes}


