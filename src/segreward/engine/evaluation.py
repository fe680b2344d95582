"""Scoring a model on a labelled set: dataset-level aAcc / mIoU / mAcc / mDice and per-class IoU,
as MMSegmentation's ``IoUMetric`` computes them (:class:`~segreward.metrics.SegMetric`).

    scores = evaluate(model, dataset, num_classes)              # the trainer's evaluation
    result = evaluate_cli("runs/x", "configs/data/synthetic_dusk_val.yaml")   # segreward evaluate
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from segreward.engine import distributed as D
from segreward.engine.calibration import model_batches
from segreward.metrics import SegMetric

__all__ = ["evaluate", "evaluate_cli", "evaluation_json", "format_evaluation"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, ignore_index: int = 255,
             batch_size: int = 8, device: torch.device | str = "cpu", info: D.DistInfo | None = None,
             amp: str = "none", progress: bool = False) -> dict:
    """Dataset-level aAcc/mIoU/mAcc/mDice (percent), per-class IoU/Acc/Dice and the number of
    labelled ``pixels`` of the argmax prediction; under DDP each rank scores a shard and the
    confusion matrices are all-reduced."""
    info = info or D.DistInfo(device=torch.device(device))
    metric = SegMetric(num_classes, ignore_index)
    passes = model_batches(model, dataset, batch_size, info.device, info.rank, info.world_size, amp=amp,
                           desc="evaluate", progress=progress)
    for logits, y in passes():
        metric.update(logits.argmax(1).cpu(), y.cpu())
    return metric.compute()


def format_evaluation(scores: dict, classes, data: str) -> str:
    """The data line, per-class IoU/Acc/Dice, and the means."""
    import math
    names = list(classes or [str(i) for i in range(len(scores["IoU"]))])
    width = max(len(n) for n in names) + 2
    f = lambda v: "nan" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    lines = [f"data: {data}", f"{'class':<{width}}{'IoU':>8}{'Acc':>8}{'Dice':>8}"]
    for name, iou, acc, dice in zip(names, scores["IoU"], scores["Acc"], scores["Dice"]):
        lines.append(f"{name:<{width}}{f(iou):>8}{f(acc):>8}{f(dice):>8}")
    lines.append(f"mIoU {f(scores['mIoU'])}  aAcc {f(scores['aAcc'])}  mAcc {f(scores['mAcc'])}  "
                 f"mDice {f(scores['mDice'])}  (dataset-level, percent)")
    return "\n".join(lines)


def evaluate_cli(model, data, split=None, fmt="folder", size=None, batch_size=8, device="auto",
                 progress=True, folder_classes=None) -> dict:
    """What ``segreward evaluate`` does: resolve the model and the data as ``segreward calibrate``
    does, score, report. Returns ``{"model", "data", "scores", "classes", "report"}``."""
    from segreward.engine.builders import dataset_info
    from segreward.engine.resolve import check_batch_size, resolve_data, resolve_device, resolve_model
    from segreward.errors import SegrewardError
    check_batch_size(batch_size)
    dev = resolve_device(device)
    net, weights, classes = resolve_model(model)
    choice = resolve_data(data, split, fmt, size, command="evaluate", classes=classes, cli_classes=folder_classes)
    num_classes, ignore_index, data_classes = dataset_info(choice.dataset)
    model_classes = getattr(net, "num_classes", None)
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise SegrewardError(f"{weights}: the model has num_classes={model_classes} but {data} has {num_classes} "
                             "classes; evaluate on data with the model's classes")
    net.to(dev)
    scores = evaluate(net, choice.dataset, num_classes, ignore_index, batch_size=batch_size, device=dev,
                      progress=progress)
    choice.info["labelled_pixels"] = scores["pixels"]
    if scores["pixels"] == 0:
        raise SegrewardError(f"{data}: no labelled pixel (every label is the ignore index {ignore_index})")
    names = list(classes or data_classes)
    scores["classes"] = names
    return {"model": str(weights), "data": choice.info, "scores": scores, "classes": names,
            "report": f"model: {weights}\n" + format_evaluation(scores, names, choice.describe())}


def evaluation_json(result: dict) -> str:
    """``{"model", "data", "scores"}`` of :func:`evaluate_cli` as strict JSON (NaN -> null)."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean({k: result[k] for k in ("model", "data", "scores")}), allow_nan=False)
