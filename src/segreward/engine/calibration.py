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
from segreward.calibrate.passes import fit_passes
from segreward.engine.builders import autocast, dataset_info, resize_logits
from segreward.errors import SegrewardError

__all__ = ["CALIBRATE_MODES", "calibrate_model", "model_batches", "resolve_device", "write_calibration",
           "format_calibration"]



def model_batches(model: nn.Module, dataset: Dataset, batch_size: int = 8, device="cpu", rank: int = 0,
                  world: int = 1, amp: str = "none", desc: str | None = None, progress: bool = False):
    """``passes()``: each call runs the model in eval mode over (this rank's shard of) the dataset
    and yields ``(float logits at the label size, labels)`` batches on ``device``. The loop of
    the trainer's evaluation and of the calibration fits."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SegrewardError(f"batch size must be a positive integer, got {batch_size!r}")
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


def format_calibration(cal: Calibration, classes=None) -> str:
    """Reward before/after, the k-fold estimate, and per-class offsets and IoU before/after."""
    lines = [f"{cal.reward} ({cal.mode}, {cal.sweeps} sweeps{'' if cal.converged else ', not converged'}): "
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
                      source: str | None = None, weights_name: str = "model.safetensors") -> dict:
    """Write ``offsets.json`` (offsets by class, rewards, k-fold estimate, per-class IoU) and the
    calibrated weights (``model`` must already hold the folded offsets); both atomically."""
    from segreward.models import save_weights
    from segreward.outputs import atomic_write_text, ensure_dir
    out = ensure_dir(out_dir, "calibration output folder")
    record = cal.to_dict()
    record["classes"] = list(classes) if classes is not None else None
    record["source"] = source
    atomic_write_text(out / "offsets.json", json.dumps(record, indent=1, allow_nan=True))
    spec = dict(getattr(model, "segreward_spec", {}) or {})
    save_weights(model, out / weights_name,
                 meta={**spec, "classes": list(classes) if classes is not None else None,
                       "calibration": {"reward": cal.reward, "offsets": record["offsets"], "source": source}})
    return {"offsets": str(out / "offsets.json"), "weights": str(out / weights_name)}


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps`` as a device that exists here, or a one-line error."""
    from segreward.engine.distributed import check_device
    check_device(device, "--device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_model(path: str | Path):
    """``(model, weights file, classes)`` from a run directory or a weights file."""
    from segreward.models import load_model, read_state_dict
    p = Path(path)
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise SegrewardError(f"{p}: no model.safetensors in this folder; give a finished run directory "
                                 "of `segreward train` or a weights file")
    elif p.exists():
        weights = p
    else:
        raise SegrewardError(f"{p}: no such run directory or weights file")
    model = load_model(weights)
    _, meta = read_state_dict(weights)
    return model, weights, meta.get("classes")


def _folder_classes(classes: str | None, fmt: str, folder: Path) -> dict:
    """The keywords that give a DATA folder its classes, from ``--classes``: a known dataset name
    (its class list), a number of classes, or comma-separated names."""
    from segreward.data.meta import known_datasets
    if classes is None:
        if fmt.lower() in ("folder", "mmseg"):
            raise SegrewardError(f"{folder}: a folder in the mmseg layout does not name its classes; give them on the "
                                 "command line: --classes cityscapes (a known dataset: "
                                 f"{', '.join(known_datasets())}), --classes 19, or --classes road,car,...")
        return {}
    if classes.lower() in known_datasets():
        return {"meta": classes.lower()}
    if classes.strip().isdigit():
        return {"classes": int(classes)}
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if len(names) < 2:
        raise SegrewardError(f"--classes {classes!r}: give a known dataset ({', '.join(known_datasets())}), a number "
                             "of classes, or at least two comma-separated names")
    return {"classes": names}


def _resolve_data(data: str | Path, split: str | None, fmt: str, size, classes: str | None = None):
    """A dataset (no augmentation) from a folder, a dataset spec YAML, or a run config YAML."""
    from segreward.engine.builders import build_data
    from segreward.engine.config import config_from_dict, read_yaml
    p = Path(data)
    if p.is_dir():
        spec = {"type": fmt, "root": str(p), **({"split": split} if split else {}),
                **({"size": tuple(size)} if size else {}), **_folder_classes(classes, fmt, p)}
        return build_data(spec)
    if classes is not None:
        raise SegrewardError(f"--classes is for a DATA folder; {p} is a file: give the classes in its dataset spec")
    tree = read_yaml(p, "dataset spec or run config")
    if not isinstance(tree, dict):
        raise SegrewardError(f"{p}: expected a dataset spec (with 'type') or a run config (with 'data'), "
                             f"got {type(tree).__name__}")
    if "type" in tree:
        spec = {**tree, **({"split": split} if split else {}), **({"size": tuple(size)} if size else {})}
        try:
            return build_data(spec)
        except SegrewardError as e:
            raise SegrewardError(f"{p}: {e}") from None
    if "data" in tree:
        try:
            cfg = config_from_dict(tree)
        except SegrewardError as e:
            raise SegrewardError(f"{p}: {e}") from None
        if split == "train":
            return build_data(cfg.data.train)
        name = split or next(iter(cfg.data.val), None)
        if name not in cfg.data.val:
            raise SegrewardError(f"{p}: no data.val set {name!r}; choose --split train or one of "
                                 f"{', '.join(cfg.data.val) or '(none)'}")
        return build_data(cfg.data.val[name])
    raise SegrewardError(f"{p}: neither a dataset spec (no 'type' key) nor a run config (no 'data' key)")


def _check_out_dir(out: Path, overwrite: bool, inputs) -> None:
    from segreward.outputs import check_output_file
    for name in ("offsets.json", "model.safetensors"):
        check_output_file(out / name, "--out", inputs=inputs, overwrite=overwrite)


def calibrate_cli(model, data, split=None, fmt="folder", size=None, out=None, overwrite=False, reward="miou",
                  class_weights=None, mode="auto", kfold=5, bound=None, max_sweeps=20, batch_size=8,
                  device="auto", progress=True, folder_classes=None) -> dict:
    """What ``segreward calibrate`` does: resolve, check every output, fit, fold, write, report."""
    from segreward.calibrate.folding import fold_offsets
    from segreward.engine.builders import read_class_weight
    if kfold is not None and kfold < 0 or kfold == 1:
        raise SegrewardError(f"--kfold must be 0 (off) or >= 2, got {kfold}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SegrewardError(f"--batch-size must be a positive integer, got {batch_size!r}")
    dev = resolve_device(device)
    net, weights, classes = _resolve_model(model)
    dataset = _resolve_data(data, split, fmt, size, folder_classes)
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
    paths = write_calibration(out, net.cpu(), cal, names, source=str(weights))
    return {**paths, "calibration": cal, "report": format_calibration(cal, names)}
