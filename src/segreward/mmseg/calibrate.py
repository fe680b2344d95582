"""Reward-optimal class offsets for an MMSegmentation checkpoint, written back as a checkpoint
that mmseg loads as it is::

    python -m segreward.mmseg.calibrate CONFIG CHECKPOINT --split val --out calibrated.pth
    python tools/test.py CONFIG calibrated.pth          # mmseg's own test: the calibrated mIoU

The model, the data loader of the split (``val`` -> ``val_dataloader``, ``test`` ->
``test_dataloader``, ``train`` -> ``train_dataloader`` with the test pipeline: no augmentation)
and the checkpoint are built and loaded by mmseg/mmengine themselves. The logits are the ones
mmseg's evaluation scores: ``model.test_step`` -> ``SegDataSample.seg_logits``, already resized
to the original image by the segmentor's postprocessing; the labels are ``gt_sem_seg`` as the
dataset's pipeline loaded them (``reduce_zero_label``, label maps), and the ignore index is the
one mmseg's ``IoUMetric`` uses (the evaluator's ``ignore_index``, else the dataset's, else 255).
So with ``--reward miou``, the fit's ``reward_after`` is the mIoU ``tools/test.py`` reports.

The offsets are fitted exactly (:mod:`segreward.calibrate`: ``exact`` holds the labelled pixels'
logits, ``streaming`` runs the model once per sweep), then added to the bias of the last decode
head's ``conv_seg`` in the checkpoint's ``state_dict``; everything else of the checkpoint is
kept, and ``meta["segreward_calibration"]`` records what was done. ``offsets.json`` goes next to
the output; logs (an mmengine log file and ``vis_data/scalars.json``) go to
``<work_dir>/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os.path as osp
import re
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from segreward.calibrate import Calibration, PixelSet
from segreward.calibrate.passes import MODES
from segreward.calibrate.folding import fold_state_dict
from segreward.calibrate.search import check_count_form
from segreward.errors import SegrewardError

__all__ = ["SPLITS", "build_parser", "calibrate", "calibrate_segmentor", "calibrated_checkpoint",
           "segmentor_batches", "split_dataloader_cfg", "main"]

PROG = "segreward.mmseg.calibrate"
# split -> (data loader key, evaluator key whose ignore_index mmseg's IoUMetric applies)
SPLITS = {"val": ("val_dataloader", "val_evaluator"), "test": ("test_dataloader", "test_evaluator"),
          "train": ("train_dataloader", "val_evaluator")}
OFFSETS_NAME = "offsets.json"


# --------------------------------------------------------------------------- data


def _plain(cfg) -> dict:
    """A deep, plain-dict copy of an mmengine ``ConfigDict`` (or a dict)."""
    return copy.deepcopy(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _find_pipeline(dataset_cfg) -> list | None:
    """The loading pipeline of a dataset config, looking inside wrappers (Repeat/Concat)."""
    if not isinstance(dataset_cfg, dict):
        return None
    if "dataset" in dataset_cfg:
        return _find_pipeline(dataset_cfg["dataset"])
    if "datasets" in dataset_cfg:
        return next((p for p in map(_find_pipeline, dataset_cfg["datasets"]) if p), None)
    return dataset_cfg.get("pipeline")


def _with_pipeline(dataset_cfg: dict, pipeline: list) -> dict:
    """The dataset config with every inner dataset's pipeline replaced; wrappers that repeat or
    mix images (``RepeatDataset``, ``MultiImageMixDataset``) are unwrapped, so each image counts once."""
    if "dataset" in dataset_cfg:
        return _with_pipeline(dataset_cfg["dataset"], pipeline)
    if "datasets" in dataset_cfg:
        return {**dataset_cfg, "datasets": [_with_pipeline(d, pipeline) for d in dataset_cfg["datasets"]]}
    return {**dataset_cfg, "pipeline": copy.deepcopy(pipeline)}


def _test_pipeline(cfg) -> list:
    if cfg.get("test_pipeline"):
        return [_plain(t) for t in cfg.test_pipeline]
    for key in ("test_dataloader", "val_dataloader"):
        loader = cfg.get(key)
        pipeline = _find_pipeline(_plain(loader).get("dataset")) if loader else None
        if pipeline:
            return pipeline
    raise SegrewardError("--split train runs the training images through the test pipeline (no augmentation), "
                         "but the config has no test_pipeline and no test_dataloader/val_dataloader pipeline")


def split_dataloader_cfg(cfg, split: str, batch_size: int | None = None) -> dict:
    """The data loader config that calibration iterates for ``split``: the config's own loader,
    in order (``DefaultSampler``, no shuffling); ``train`` gets the test pipeline and batch size 1
    (test-mode batches must hold images of one size)."""
    if split not in SPLITS:
        raise SegrewardError(f"--split {split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    key = SPLITS[split][0]
    loader = cfg.get(key)
    if not loader or not loader.get("dataset"):
        raise SegrewardError(f"the config has no {key} (with a dataset), which --split {split} uses; "
                             f"choose another split or add {key} to the config")
    out = _plain(loader)
    if split == "train":
        out["dataset"] = _with_pipeline(out["dataset"], _test_pipeline(cfg))
        out["batch_size"] = 1
    out["sampler"] = dict(type="DefaultSampler", shuffle=False)
    for k in ("batch_sampler", "drop_last"):
        out.pop(k, None)
    if batch_size is not None:
        out["batch_size"] = batch_size
    if not out.get("num_workers"):
        out["persistent_workers"] = False  # DataLoader refuses persistent workers without workers
    return out


def _build_loader(cfg, split: str, batch_size: int | None):
    from mmengine.runner import Runner

    loader_cfg = split_dataloader_cfg(cfg, split, batch_size)
    try:
        loader = Runner.build_dataloader(loader_cfg)
    except (KeyError, FileNotFoundError, NotADirectoryError, TypeError, ValueError) as e:
        msg = str(e).strip().strip("'\"").splitlines()[0] if str(e).strip() else type(e).__name__
        raise SegrewardError(f"building the {SPLITS[split][0]} of the config failed ({type(e).__name__}: "
                             f"{msg})") from None
    if len(loader.dataset) == 0:
        raise SegrewardError(f"the {SPLITS[split][0]} of the config has no images (check its data_root and "
                             "data_prefix)")
    return loader


def _ignore_index(cfg, split: str, dataset, head) -> int:
    """What mmseg's IoUMetric ignores: the evaluator's ``ignore_index``, else the dataset's, else
    the decode head's, else 255."""
    evaluator = cfg.get(SPLITS[split][1])
    for metric in (evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]):
        if isinstance(metric, dict) and metric.get("ignore_index") is not None:
            return int(metric["ignore_index"])
    for owner in (dataset, head):
        value = getattr(owner, "ignore_index", None)
        if isinstance(value, int):
            return value
    return 255


# --------------------------------------------------------------------------- model and checkpoint


def _build_segmentor(cfg) -> nn.Module:
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS

    model_cfg = copy.deepcopy(cfg.model)
    # As mmseg's init_model: no pretrained backbone download, no training-time settings.
    model_cfg.pretrained = None
    model_cfg.train_cfg = None
    if isinstance(model_cfg.get("backbone"), dict) and "init_cfg" in model_cfg.backbone:
        model_cfg.backbone.init_cfg = None
    model = MODELS.build(model_cfg)
    return revert_sync_batchnorm(model)  # one process: SyncBN -> BN, as mmengine's Runner does


def _last_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """``(state-dict name, layer)`` of the ``conv_seg`` whose output is the segmentor's logits
    (the last head of a cascade; the auxiliary head is not used at inference)."""
    head, name = getattr(model, "decode_head", None), "decode_head"
    if isinstance(head, nn.ModuleList):
        head, name = head[-1], f"decode_head.{len(head) - 1}"
    conv = getattr(head, "conv_seg", None)
    if not isinstance(conv, nn.Module) or not hasattr(conv, "weight"):
        raise SegrewardError(f"{type(model).__name__}: its decode head {type(head).__name__} has no conv_seg "
                             "classifier to fold offsets into; segreward.mmseg.calibrate supports heads whose "
                             "logits come from conv_seg (FCN, DeepLabV3(+), PSP, UPer, SegFormer, OCR, ...)")
    return f"{name}.conv_seg", conv


def _state_dict(ckpt) -> dict:
    return ckpt["state_dict"] if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) else ckpt


def _key_in(state: dict, key: str) -> str | None:
    for k in (key, f"module.{key}"):
        if k in state:
            return k
    return None


def _check_head(model: nn.Module, state: dict, checkpoint, num_classes: int, classes, split: str) -> str:
    """The checkpoint's bias key of the last classifier, after checking that the checkpoint, the
    config's head and the dataset agree on the classes and that the head has a bias."""
    name, conv = _last_classifier(model)
    head_classes = int(conv.weight.shape[0])
    weight_key = _key_in(state, f"{name}.weight")
    if weight_key is None:
        raise SegrewardError(f"checkpoint {checkpoint}: no {name}.weight in its state_dict; is it a checkpoint "
                             "of this config's model?")
    ckpt_classes = int(state[weight_key].shape[0])
    if ckpt_classes != head_classes:
        raise SegrewardError(f"checkpoint {checkpoint} has {ckpt_classes} classes ({name}.weight) but the config's "
                             f"decode head has num_classes={head_classes}; give the config the checkpoint was "
                             "trained with")
    if head_classes == 1:
        raise SegrewardError(f"{name} has one output channel (a binary head with a sigmoid threshold); "
                             "calibration needs one logit per class (num_classes >= 2, out_channels = num_classes)")
    if head_classes != num_classes:
        shown = ", ".join(map(str, list(classes)[:8])) + (", ..." if len(classes) > 8 else "")
        raise SegrewardError(f"checkpoint {checkpoint} predicts {head_classes} classes but the {SPLITS[split][0]} "
                             f"dataset has {num_classes} ({shown}); calibrate on data with the model's classes")
    bias_key = _key_in(state, f"{name}.bias")
    if getattr(conv, "bias", None) is None or bias_key is None:
        raise SegrewardError(f"{name} of checkpoint {checkpoint} has no bias to hold the offsets; build the head "
                             "with a biased conv_seg (mmseg's default) and retrain, or add the offsets to the "
                             "logits yourself (offsets.json)")
    return bias_key


def _load_weights(model: nn.Module, state: dict, logger) -> None:
    """mmengine's ``load_checkpoint`` on an already read checkpoint (same key revision, strict=False)."""
    from mmengine.runner.checkpoint import load_state_dict

    revised = OrderedDict((re.sub(r"^module\.", "", k), v) for k, v in state.items())
    load_state_dict(model, revised, strict=False, logger=logger)


# --------------------------------------------------------------------------- fitting


def segmentor_batches(model: nn.Module, loader, progress: bool = False, desc: str = "logits"):
    """``passes()`` for the calibration fits: each call runs ``model.test_step`` over the loader
    (as mmseg's test loop does) and yields ``(seg_logits [1, C, H, W], gt_sem_seg [1, H, W])``
    per image, at the original image size."""

    @torch.no_grad()
    def passes():
        model.eval()
        for data in tqdm(loader, desc=desc, disable=not progress, leave=False):
            for sample in model.test_step(data):
                where = osp.basename(sample.metainfo.get("img_path") or "") or "an image"
                if "gt_sem_seg" not in sample:
                    raise SegrewardError(f"{where} has no gt_sem_seg: calibration needs labels, so the split's "
                                         "pipeline must load annotations (LoadAnnotations before PackSegInputs)")
                logits, labels = sample.seg_logits.data, sample.gt_sem_seg.data
                if logits.shape[-2:] != labels.shape[-2:]:
                    raise SegrewardError(f"{where}: seg_logits {tuple(logits.shape)} do not match gt_sem_seg "
                                         f"{tuple(labels.shape)}; load the annotation after resizing the image "
                                         "(mmseg's test pipelines do), so labels keep the original size")
                yield logits.unsqueeze(0).float(), labels.reshape(1, *labels.shape[-2:])

    return passes


def calibrate_segmentor(model: nn.Module, loader, num_classes: int, ignore_index: int = 255, reward="miou",
                        mode: str = "auto", kfold: int | None = 5, bound: float | None = None,
                        max_sweeps: int = 20, bins: int = 1024, span: float = 8.0, class_weights=None,
                        progress: bool = False) -> Calibration:
    """Fit offsets for an mmseg segmentor on a data loader of its (labelled) images."""
    from segreward.calibrate.passes import fit_passes

    h, w = loader.dataset[0]["data_samples"].metainfo["ori_shape"][:2] if mode == "auto" else (0, 0)
    passes = segmentor_batches(model, loader, progress=progress)
    cal, pixels = fit_passes(passes, num_classes, ignore_index, mode=mode,
                             values=len(loader.dataset) * h * w * num_classes, reward=reward, kfold=kfold,
                             bound=bound, max_sweeps=max_sweeps, bins=bins, span=span, class_weights=class_weights,
                             progress=progress)
    if pixels is not None:
        _warn_near_boundary(pixels, cal.offsets)
    return cal


def near_boundary(pixels: PixelSet, offsets: torch.Tensor, rel: float = 1e-5) -> int:
    """How many labelled pixels have their top two classes under ``offsets`` closer than
    ``rel * max(1, max |logit|)``: float32 rounding in the folded model can flip them, so the
    reward the folded model scores may differ from the fit's by their weight."""
    s = pixels.z + offsets.to(pixels.z)
    top = s.topk(2, dim=1).values
    eps = rel * max(1.0, float(pixels.z.abs().max()))
    return int((top[:, 0] - top[:, 1] < eps).sum())


def _warn_near_boundary(pixels: PixelSet, offsets: torch.Tensor) -> None:
    from mmengine.logging import print_log

    n = near_boundary(pixels, offsets)
    if n:
        print_log(f"{n} of {pixels.t.numel()} labelled pixels are within float32 rounding of a tie between their "
                  "top two classes under the offsets; the calibrated checkpoint may score slightly differently "
                  "than reported (check with tools/test.py)", logger="current", level=logging.WARNING)


# --------------------------------------------------------------------------- outputs


def calibrated_checkpoint(ckpt: dict, offsets, key: str, record: dict) -> dict:
    """The checkpoint with ``offsets`` folded into ``state_dict[key]`` and ``record`` in
    ``meta["segreward_calibration"]``; everything else kept (a bare state dict gets wrapped)."""
    state = _state_dict(ckpt)
    out = dict(ckpt) if state is not ckpt else {}
    folded, key = fold_state_dict(state, offsets, key)
    folded = OrderedDict(folded)
    if hasattr(state, "_metadata"):  # module versions, used by BatchNorm's loader
        folded._metadata = copy.deepcopy(state._metadata)
    out["state_dict"] = folded
    out["meta"] = {**dict(out.get("meta") or {}), "segreward_calibration": record}
    return out


def _open_run_dir(work_dir: Path, cfg):
    """``(run folder, MMLogger, LocalVisBackend)`` in mmengine's layout: ``<work_dir>/<timestamp>/``
    with ``<timestamp>.log`` and ``vis_data/scalars.json``."""
    from mmengine.logging import MMLogger
    from mmengine.visualization import LocalVisBackend

    from segreward.outputs import ensure_dir

    stamp = time.strftime("%Y%m%d_%H%M%S")
    run, i = work_dir / stamp, 1
    while run.exists():
        run, i = work_dir / f"{stamp}_{i}", i + 1
    ensure_dir(run, "--work-dir")
    logger = MMLogger.get_instance(f"{PROG}.{uuid.uuid4().hex}", log_file=str(run / f"{run.name}.log"),
                                   log_level="INFO")
    backend = LocalVisBackend(save_dir=str(run / "vis_data"))
    backend.add_config(cfg)
    return run, logger, backend


def _release_logger(logger) -> None:
    """Close the log file and stop being mmengine's current logger (the previous one is again)."""
    from mmengine.logging import MMLogger

    for h in list(logger.handlers):
        logger.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    MMLogger._instance_dict.pop(logger.instance_name, None)


def _log_scalars(backend, cal: Calibration) -> None:
    for step, r in enumerate(cal.history, 1):
        backend.add_scalars({"calibrate.reward": r}, step=step)
    final = {"calibrate.reward_before": cal.reward_before, "calibrate.reward_after": cal.reward_after,
             "calibrate.gain": cal.reward_after - cal.reward_before}
    for when, scores in (("before", cal.scores_before), ("after", cal.scores_after)):
        for name in ("mIoU", "aAcc", "mAcc"):
            if scores and name in scores:
                final[f"calibrate.{name}_{when}"] = scores[name]
    if cal.cv and "gain" in cal.cv:
        final.update({"calibrate.kfold_reward_before": cal.cv["reward_before"],
                      "calibrate.kfold_reward_after": cal.cv["reward_after"], "calibrate.kfold_gain": cal.cv["gain"]})
    backend.add_scalars(final, step=max(1, cal.sweeps))


def calibrate(config, checkpoint, split: str = "val", out=None, overwrite: bool = False, reward="miou",
              class_weights=None, mode: str = "auto", kfold: int | None = 5, bound: float | None = None,
              max_sweeps: int = 20, bins: int = 1024, span: float = 8.0, batch_size: int | None = None,
              work_dir=None, cfg_options: list[str] | None = None, device: str = "auto",
              progress: bool = True) -> dict:
    """What ``python -m segreward.mmseg.calibrate`` does: check the inputs and outputs, build the
    model and data through mmseg, fit, fold, write ``--out`` and ``offsets.json``, log.

    Returns ``{"checkpoint", "offsets", "run_dir", "key", "calibration", "report"}``.
    """
    from segreward.engine.builders import read_class_weight
    from segreward.engine.calibration import format_calibration
    from segreward.mmseg.train import load_config
    from segreward.outputs import atomic_save, atomic_write_text, check_output_file

    if mode not in MODES:
        raise SegrewardError(f"--mode {mode!r} is not valid; choose one of: {', '.join(MODES)}")
    if split not in SPLITS:
        raise SegrewardError(f"--split {split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    if kfold is not None and (kfold < 0 or kfold == 1):
        raise SegrewardError(f"--kfold must be 0 (off) or >= 2, got {kfold}")
    checkpoint = Path(checkpoint).expanduser()
    if not osp.isfile(config):
        raise SegrewardError(f"{config}: config file not found")
    if not checkpoint.is_file():
        raise SegrewardError(f"{checkpoint}: checkpoint file not found")
    out = Path(out).expanduser() if out else checkpoint.with_name(f"{checkpoint.stem}_calibrated.pth")
    inputs = [checkpoint, Path(config)]
    out = check_output_file(out, "--out", inputs=inputs, overwrite=overwrite)
    offsets_path = check_output_file(out.parent / OFFSETS_NAME, "--out (offsets.json next to it)", inputs=inputs,
                                     overwrite=overwrite)
    from segreward.engine.resolve import resolve_device
    dev = resolve_device(device)

    try:
        cfg = load_config(str(config), work_dir=None if work_dir is None else str(work_dir), cfg_options=cfg_options)
    except SegrewardError:
        raise
    except Exception as e:  # a broken config file: mmengine raises whatever parsing it raised
        raise SegrewardError(f"{config}: cannot read the config ({type(e).__name__}: {e})") from None
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get("default_scope", "mmseg"))

    loader = _build_loader(cfg, split, batch_size)
    dataset = loader.dataset
    classes = list(dataset.metainfo.get("classes") or [])
    if not classes:
        raise SegrewardError(f"the {SPLITS[split][0]} dataset names no classes (metainfo['classes'])")
    num_classes = len(classes)
    weights = read_class_weight(class_weights, num_classes)
    check_count_form(reward, num_classes, weights)

    from mmengine.runner.checkpoint import CheckpointLoader
    ckpt = CheckpointLoader.load_checkpoint(str(checkpoint), map_location="cpu")
    state = _state_dict(ckpt)
    if not isinstance(state, dict) or not state:
        raise SegrewardError(f"checkpoint {checkpoint}: not an mmengine checkpoint (no state_dict)")
    model = _build_segmentor(cfg)
    key = _check_head(model, state, checkpoint, num_classes, classes, split)
    ignore_index = _ignore_index(cfg, split, dataset, model.decode_head)

    run_dir, logger, backend = _open_run_dir(Path(cfg.work_dir), cfg)
    try:
        logger.info(f"calibrating {checkpoint} ({config}) on the {split} split: {len(dataset)} images, "
                    f"{num_classes} classes, ignore index {ignore_index}, reward {reward}, mode {mode}")
        _load_weights(model, state, logger)
        model.to(dev)
        cal = calibrate_segmentor(model, loader, num_classes, ignore_index, reward=reward, mode=mode,
                                  kfold=kfold or None, bound=bound, max_sweeps=max_sweeps, bins=bins, span=span,
                                  class_weights=weights, progress=progress)
        report = format_calibration(cal, classes)
        logger.info("calibration:\n" + report)
        _log_scalars(backend, cal)

        offsets = [float(v) for v in cal.offsets]
        source = {"checkpoint": str(checkpoint), "config": str(config), "split": split, "key": key,
                  "ignore_index": ignore_index}
        record = {"reward": cal.reward, "mode": cal.mode, "offsets": offsets, "classes": classes,
                  "reward_before": cal.reward_before, "reward_after": cal.reward_after,
                  "kfold": {k: v for k, v in (cal.cv or {}).items() if k != "fold_offsets"} or None, **source}
        calibrated = calibrated_checkpoint(ckpt, cal.offsets, key, record)
        if "dataset_meta" not in calibrated["meta"]:
            calibrated["meta"]["dataset_meta"] = dict(classes=tuple(classes),
                                                      palette=dataset.metainfo.get("palette"))
        atomic_save(out, lambda tmp: torch.save(calibrated, tmp))
        full = {**cal.to_dict(), "classes": classes, **source, "calibrated_checkpoint": str(out)}
        atomic_write_text(offsets_path, json.dumps(full, indent=1, allow_nan=True))
        logger.info(f"calibrated checkpoint: {out} (offsets folded into {key}); offsets: {offsets_path}")
    except SegrewardError as e:
        logger.error(f"calibration failed: {e}")
        raise
    finally:
        _release_logger(logger)
        backend.close()
    return {"checkpoint": str(out), "offsets": str(offsets_path), "run_dir": str(run_dir), "key": key,
            "calibration": cal, "report": report}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Fit one logit offset per class of an MMSegmentation model on the dataset-level reward "
                    "(default: mIoU) of a labelled split, exactly, and write a calibrated checkpoint (the offsets "
                    "folded into the decode head's conv_seg bias) that mmseg's tools/test.py loads as it is, "
                    "plus offsets.json next to it.")
    p.add_argument("config", help="mmseg config file (Python) the checkpoint was trained with")
    p.add_argument("checkpoint", help="mmseg/mmengine checkpoint (.pth)")
    p.add_argument("--split", default="val", choices=list(SPLITS),
                   help="data to calibrate on: the config's val_dataloader (default), test_dataloader, or "
                        "train_dataloader run through the test pipeline")
    p.add_argument("--out", help="calibrated checkpoint (default: <checkpoint stem>_calibrated.pth next to it); "
                                 "offsets.json is written next to it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its offsets.json")
    p.add_argument("--reward", default="miou", help="miou | weighted_miou | dice | pixel_accuracy (default: miou)")
    p.add_argument("--class-weights", help="weights.json of `segreward stats weights` (for weighted_miou)")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="exact: hold the split's labelled logits; streaming: one model pass per sweep; "
                        "auto: by size (default)")
    p.add_argument("--kfold", type=int, default=5, help="k-fold estimate of the gain on unseen images "
                                                        "(exact mode; 0: off; default 5)")
    p.add_argument("--bound", type=float, help="limit |offset| (logits) during the search")
    p.add_argument("--max-sweeps", type=int, default=20, help="sweeps over the classes at most (default 20)")
    p.add_argument("--bins", type=int, default=1024, help="streaming mode: threshold bins per class (default 1024)")
    p.add_argument("--span", type=float, default=8.0,
                   help="streaming mode: the most an offset moves in one sweep, in logits (default 8)")
    p.add_argument("--batch-size", type=int, help="override the split's data loader batch size")
    p.add_argument("--work-dir", help="where the log and vis_data/scalars.json go (default: the config's "
                                      "work_dir, else ./work_dirs/<config name>), under a timestamp folder")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override config entries, e.g. val_dataloader.num_workers=0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = calibrate(args.config, args.checkpoint, split=args.split, out=args.out, overwrite=args.overwrite,
                           reward=args.reward, class_weights=args.class_weights, mode=args.mode, kfold=args.kfold,
                           bound=args.bound, max_sweeps=args.max_sweeps, bins=args.bins, span=args.span,
                           batch_size=args.batch_size, work_dir=args.work_dir, cfg_options=args.cfg_options,
                           device=args.device, progress=args.progress)
    except SegrewardError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"calibrated checkpoint: {result['checkpoint']}")
    print(f"offsets: {result['offsets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
