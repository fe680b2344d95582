"""``segreward train CONFIG [key=value ...] [--resume]`` (also under ``torchrun -m segreward``)."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("train", help="run one stage (pretrain or tune) from a YAML config",
                       description="Train from a YAML config. Overrides use dotted keys, e.g. loss.k=8 "
                                   "train.iters=200. Multi-process: torchrun --nproc_per_node=N -m segreward train ...")
    p.add_argument("config", metavar="CONFIG", help="YAML config file (the one required argument)")
    # default=[]: without it argparse lists KEY=VALUE as required too when CONFIG is missing
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="optional dotted overrides, "
                   "e.g. optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue the run in the work dir from its "
                   "checkpoints/last.pt (without one: start from scratch and say so)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the work dir (its "
                   "checkpoints, weights, summary, log and config), once the config and data have been checked")
    p.add_argument("--work-dir", help="run directory (default: the config's work_dir, else runs/<name>)")
    p.set_defaults(func=run)


def run(args) -> int:
    from segreward.engine import load_config, train

    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, inputs=[args.config])
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    for name, scores in result["val"].items():
        print(f"{name}: mIoU {scores['mIoU']:.2f}  aAcc {scores['aAcc']:.2f}  mAcc {scores['mAcc']:.2f}")
    for name, scores in result.get("val_calibrated", {}).items():
        print(f"{name} (calibrated): mIoU {scores['mIoU']:.2f}  aAcc {scores['aAcc']:.2f}  mAcc {scores['mAcc']:.2f}")
    print(f"run directory: {result['work_dir']}")
    return 0
