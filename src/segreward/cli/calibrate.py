"""``segreward calibrate MODEL DATA [--out DIR]``: reward-optimal class offsets, folded into the weights."""

from __future__ import annotations

import argparse
import sys

from segreward.cli._model_data import DATA_HELP, add_model_data_arguments


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit one logit offset per class on a labelled set's mIoU and fold it into the model",
        description="Choose one additive logit offset per class that maximises the dataset-level reward "
                    "(default: mIoU) of a labelled set, exactly, and write offsets.json plus the calibrated "
                    "weights (the offsets folded into the last layer's bias). " + DATA_HELP)
    add_model_data_arguments(p)
    p.add_argument("--out", help="output folder (default: <run>/calibrated, or <weights stem>_calibrated)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier calibration")
    p.add_argument("--reward", default="miou", help="miou | weighted_miou | dice | pixel_accuracy (default: miou)")
    p.add_argument("--class-weights", help="weights.json of `segreward stats weights` (for weighted_miou)")
    p.add_argument("--mode", default="auto", choices=("auto", "exact", "streaming"),
                   help="exact: hold the set's logits (few labels); streaming: one model pass per sweep "
                        "(large sets); auto: by size (default)")
    p.add_argument("--kfold", type=int, default=5, help="k-fold estimate of the gain on unseen images (0: off)")
    p.add_argument("--bound", type=float, help="limit |offset| (logits) during the search")
    p.add_argument("--max-sweeps", type=int, default=20, help="sweeps over the classes at most (default 20)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segreward.engine.calibration import calibrate_cli
    result = calibrate_cli(model=args.model, data=args.data, split=args.split, fmt=args.format, size=args.size,
                           out=args.out, overwrite=args.overwrite, reward=args.reward,
                           class_weights=args.class_weights, mode=args.mode, kfold=args.kfold, bound=args.bound,
                           max_sweeps=args.max_sweeps, batch_size=args.batch_size, device=args.device,
                           progress=args.progress, folder_classes=args.classes)
    for warning in result["warnings"]:
        print(f"segreward calibrate: warning: {warning}", file=sys.stderr)
    print(result["report"])
    print(f"offsets: {result['offsets']}")
    print(f"calibrated weights: {result['weights']}")
    return 0

