"""``segreward evaluate MODEL DATA [--json]``: dataset-level mIoU, per-class IoU, aAcc, mAcc, mDice."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a run or weights file on a labelled set (mIoU, per-class IoU, aAcc, mAcc, mDice)",
        description="Score a model on a labelled set, dataset-level as MMSegmentation's IoUMetric computes it "
                    "(one confusion matrix summed over all images; a class absent from both the labels and "
                    "the predictions is left out of the means). MODEL is a run directory of `segreward train` "
                    "or a weights file (e.g. a calibrated model.safetensors); DATA is a dataset spec YAML "
                    "(see configs/data/), a run config (its first data.val set, a data.val name or 'train' "
                    "with --split), or a folder in the mmseg layout (img_dir/, ann_dir/).")
    p.add_argument("model", metavar="MODEL", help="run directory (model.safetensors) or weights file")
    p.add_argument("data", metavar="DATA", help="dataset spec YAML, run config YAML, or mmseg-layout folder")
    p.add_argument("--split", help="split of a folder / dataset spec; with a run config: 'train' or a data.val name")
    p.add_argument("--format", default="folder", help="dataset format of a DATA folder (default: folder; "
                                                      "camvid, cityscapes, ...)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images and labels (a DATA folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, data, scores; NaN as "
                                                       "null) instead of the table")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segreward.engine.evaluation import evaluate_cli, evaluation_json
    result = evaluate_cli(model=args.model, data=args.data, split=args.split, fmt=args.format, size=args.size,
                          batch_size=args.batch_size, device=args.device, progress=args.progress)
    if args.json:
        print(evaluation_json(result))
    else:
        print(result["report"])
    return 0
