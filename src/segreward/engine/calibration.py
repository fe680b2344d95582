"""Calibrating a model on a dataset: run it, fit the offsets, fold them in, write the results.

    cal = calibrate_model(model, dataset, reward="miou", mode="exact", kfold=5)
    fold_offsets(model, cal.offsets)
    write_calibration(out_dir, model, cal, classes)       # offsets.json + model.safetensors

``mode="exact"`` holds the labelled pixels' logits of the whole set (the few-label case);
``mode="streaming"`` runs the model once per sweep and holds one batch (large sets); ``auto``
picks exact below ``exact_limit`` labelled pixels. Under DDP each rank runs its shard and the
streaming histograms are all-reduced (exact mode gathers nothing: run it on one process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segreward.calibrate import Calibration
from segreward.calibrate.passes import MODES as CALIBRATE_MODES
from segreward.engine.resolve import check_batch_size
from segreward.calibrate.passes import fit_passes
from segreward.engine.builders import autocast, dataset_info, resize_logits
from segreward.errors import SegrewardError

__all__ = ["CALIBRATE_MODES", "calibrate_model", "model_batches", "write_calibration", "format_calibration"]

def model_batches(model: nn.Module, dataset: Dataset, batch_size: int = 8, device="cpu", rank: int = 0,
                  world: int = 1, amp: str = "none", desc: str | None = None, progress: bool = False):
    """``passes()``: each call runs the model in eval mode over (this rank's shard of) the dataset
    and yields ``(float logits at the label size, labels)`` batches on ``device``. The loop of
    the trainer's evaluation and of the calibration fits."""
    check_batch_size(batch_size, "batch size")
    device = torch.device(device)
    indices = list(range(rank, len(dataset), world))

    @torch.no_grad()
    def passes():
        was_training = model.training
        model.eval()
        # Its own generator: a DataLoader draws a seed from the global RNG otherwise, and then how
        # often a run evaluates would change the random numbers (augmentation, samples) of training.
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                            generator=torch.Generator())
        try:
            for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
                x, y = x.to(device), y.to(device)
                with autocast(device, amp):
                    logits = model(x)
                yield resize_logits(logits.float(), y.shape[-2:]), y
        finally:
            model.train(was_training)

    return passes


def calibrate_model(model: nn.Module, dataset: Dataset, reward="miou", mode: str = "auto", kfold: int | None = 5,
                    bound: float | None = None, max_sweeps: int = 20, bins: int = 1024, span: float = 8.0,
                    class_weights=None, batch_size: int = 8, device="cpu", rank: int = 0, world: int = 1,
                    progress: bool = True) -> Calibration:
    """Fit offsets of ``model`` on ``dataset`` (``(image, label)`` items with a ``meta``/``classes``)."""
    if len(dataset) == 0:
        raise SegrewardError("the calibration dataset is empty")
    num_classes, ignore_index, _ = dataset_info(dataset)
    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise SegrewardError(f"the model has num_classes={model_classes} but the calibration data has "
                             f"{num_classes} classes")
    values = len(dataset) * dataset[0][1].numel() * num_classes if mode == "auto" else None
    passes = model_batches(model, dataset, batch_size, device, rank, world, desc="logits", progress=progress)
    cal, _ = fit_passes(passes, num_classes, ignore_index, mode=mode, values=values, reward=reward, kfold=kfold,
                        bound=bound, max_sweeps=max_sweeps, bins=bins, span=span, class_weights=class_weights,
                        distributed=world > 1, progress=progress)
    return cal


def format_calibration(cal: Calibration, classes=None, data: str | None = None) -> str:
    """What it was fitted on (``data``: one line), reward before/after, the k-fold estimate,
    and per-class offsets and IoU before/after."""
    lines = [f"fitted on {data}"] if data else []
    lines += [f"{cal.reward} ({cal.mode}, {cal.sweeps} sweeps{'' if cal.converged else ', not converged'}): "
             f"{100 * cal.reward_before:.2f} -> {100 * cal.reward_after:.2f} "
             f"({100 * (cal.reward_after - cal.reward_before):+.2f})"]
    cv = cal.cv or {}
    if "gain" in cv:
        gains = cv["fold_gains"]
        mean = sum(gains) / len(gains)
        std = math.sqrt(sum((g - mean) ** 2 for g in gains) / max(1, len(gains) - 1))
        lines.append(f"{cv['k']}-fold estimate on held-out images: {100 * cv['reward_before']:.2f} -> "
                     f"{100 * cv['reward_after']:.2f} ({100 * cv['gain']:+.2f}; per fold {100 * mean:+.2f} "
                     f"± {100 * std:.2f})")
    elif "skipped" in cv:
        lines.append(f"k-fold estimate skipped: {cv['skipped']}")
    names = list(classes or [str(i) for i in range(cal.offsets.numel())])
    width = max(len(n) for n in names) + 2
    lines.append(f"{'class':<{width}}{'offset':>8}{'IoU before':>12}{'IoU after':>11}")
    before = (cal.scores_before or {}).get("IoU", [float("nan")] * len(names))
    after = (cal.scores_after or {}).get("IoU", [float("nan")] * len(names))
    for name, b, x, y in zip(names, cal.offsets.tolist(), before, after):
        lines.append(f"{name:<{width}}{b:>+8.3f}{x:>12.2f}{y:>11.2f}")
    return "\n".join(lines)


def write_calibration(out_dir: str | Path, model: nn.Module, cal: Calibration, classes=None,
                      source: str | None = None, weights_name: str = "model.safetensors",
                      data: dict | None = None) -> dict:
    """Write ``offsets.json`` (offsets by class, rewards, k-fold estimate, per-class IoU, the data
    it was fitted on: ``data``, see :class:`~segreward.engine.resolve.DataChoice`) and the
    calibrated weights (``model`` must already hold the folded offsets); both atomically."""
    from segreward.models import save_weights
    from segreward.outputs import atomic_write_text, ensure_dir
    out = ensure_dir(out_dir, "calibration output folder")
    record = cal.to_dict()
    record["classes"] = list(classes) if classes is not None else None
    record["source"] = source
    record["data"] = data
    atomic_write_text(out / "offsets.json", json.dumps(record, indent=1, allow_nan=True))
    spec = dict(getattr(model, "segreward_spec", {}) or {})
    save_weights(model, out / weights_name,
                 meta={**spec, "classes": list(classes) if classes is not None else None,
                       "calibration": {"reward": cal.reward, "offsets": record["offsets"], "source": source,
                                       "data": data}})
    return {"offsets": str(out / "offsets.json"), "weights": str(out / weights_name)}


def _check_out_dir(out: Path, overwrite: bool, inputs) -> None:
    from segreward.outputs import check_output_file
    for name in ("offsets.json", "model.safetensors"):
        check_output_file(out / name, "--out", inputs=inputs, overwrite=overwrite)


def calibrate_cli(model, data, split=None, fmt="folder", size=None, out=None, overwrite=False, reward="miou",
                  class_weights=None, mode="auto", kfold=5, bound=None, max_sweeps=20, batch_size=8,
                  device="auto", progress=True, folder_classes=None) -> dict:
    """What ``segreward calibrate`` does: resolve, check every output, fit, fold, write, report.
    Returns ``{"offsets", "weights", "calibration", "data" (what it was fitted on), "warnings",
    "report"}``."""
    from segreward.calibrate.folding import fold_offsets
    from segreward.engine.builders import read_class_weight
    from segreward.engine.resolve import resolve_data, resolve_device, resolve_model
    if kfold is not None and kfold < 0 or kfold == 1:
        raise SegrewardError(f"--kfold must be 0 (off) or >= 2, got {kfold}")
    check_batch_size(batch_size)
    dev = resolve_device(device)
    net, weights, classes = resolve_model(model)
    choice = resolve_data(data, split, fmt, size, command="calibrate", classes=classes, cli_classes=folder_classes)
    dataset = choice.dataset
    num_classes, _, data_classes = dataset_info(dataset)
    if out is None:
        src = Path(model)
        out = src / "calibrated" if src.is_dir() else src.with_name(f"{src.stem}_calibrated")
    out = Path(out)
    _check_out_dir(out, overwrite, inputs=[weights])
    weights_cw = read_class_weight(class_weights, num_classes)
    net.to(dev)
    cal = calibrate_model(net, dataset, reward=reward, mode=mode, kfold=kfold or None, bound=bound,
                          max_sweeps=max_sweeps, class_weights=weights_cw, batch_size=batch_size, device=dev,
                          progress=progress)
    fold_offsets(net, cal.offsets)
    names = classes or data_classes
    choice.info["labelled_pixels"] = cal.scores_before["pixels"]
    paths = write_calibration(out, net.cpu(), cal, names, source=str(weights), data=choice.info)
    return {**paths, "calibration": cal, "data": choice.info, "warnings": choice.warnings,
            "report": format_calibration(cal, names, data=choice.describe())}
