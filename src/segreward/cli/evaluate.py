"""``segreward evaluate MODEL DATA [--json]``: dataset-level mIoU, per-class IoU, aAcc, mAcc, mDice."""

from __future__ import annotations

import argparse

from segreward.cli._model_data import DATA_HELP, add_model_data_arguments


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a run or weights file on a labelled set (mIoU, per-class IoU, aAcc, mAcc, mDice)",
        description="Score a model on a labelled set, dataset-level as MMSegmentation's IoUMetric computes it "
                    "(one confusion matrix summed over all images; a class absent from both the labels and "
                    "the predictions is left out of the means). " + DATA_HELP)
    add_model_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (model, data, scores; NaN as "
                                                       "null) instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segreward.engine.evaluation import evaluate_cli, evaluation_json
    result = evaluate_cli(model=args.model, data=args.data, split=args.split, fmt=args.format, size=args.size,
                          batch_size=args.batch_size, device=args.device, progress=args.progress,
                          folder_classes=args.classes)
    if args.json:
        print(evaluation_json(result))
    else:
        print(result["report"])
    return 0
