"""``segreward calibrate MODEL DATA [--out DIR]``: reward-optimal class offsets, folded into the weights."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit one logit offset per class on a labelled set's mIoU and fold it into the model",
        description="Choose one additive logit offset per class that maximises the dataset-level reward "
                    "(default: mIoU) of a labelled set, exactly, and write offsets.json plus the calibrated "
                    "weights (the offsets folded into the last layer's bias). MODEL is a run directory of "
                    "`segreward train` or a weights file written by it; DATA is a dataset spec YAML "
                    "(e.g. `type: camvid`, `root: ...`, `split: val`), a run config (its first data.val set, "
                    "or data.train with --split train), or a folder in the mmseg layout (img_dir/, ann_dir/).")
    p.add_argument("model", metavar="MODEL", help="run directory (model.safetensors) or weights file")
    p.add_argument("data", metavar="DATA", help="dataset spec YAML, run config YAML, or mmseg-layout folder")
    p.add_argument("--split", help="split of a folder / dataset spec; with a run config: 'train' or a data.val name")
    p.add_argument("--format", default="folder", help="dataset format of a DATA folder (default: folder; "
                                                      "camvid, cityscapes, ...)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images and labels (a DATA folder)")
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
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segreward.engine.calibration import calibrate_cli
    result = calibrate_cli(model=args.model, data=args.data, split=args.split, fmt=args.format, size=args.size,
                           out=args.out, overwrite=args.overwrite, reward=args.reward,
                           class_weights=args.class_weights, mode=args.mode, kfold=args.kfold, bound=args.bound,
                           max_sweeps=args.max_sweeps, batch_size=args.batch_size, device=args.device,
                           progress=args.progress)
    for warning in result["warnings"]:
        print(f"segreward calibrate: warning: {warning}", file=sys.stderr)
    print(result["report"])
    print(f"offsets: {result['offsets']}")
    print(f"calibrated weights: {result['weights']}")
    return 0

