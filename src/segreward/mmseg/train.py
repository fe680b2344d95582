"""Train an mmseg config with segreward's plug-in loaded -- mmseg's ``tools/train.py`` without
cloning mmseg or installing ``mim``.

One process (CPU or one GPU)::

    python -m segreward.mmseg.train configs/mmseg/synthetic_dusk_reinforce.py

Several GPUs on one machine (the standard mmengine launcher; ``--launcher pytorch`` makes the
Runner initialise ``torch.distributed`` from the variables torchrun sets)::

    torchrun --nproc_per_node=4 -m segreward.mmseg.train CONFIG --launcher pytorch

Options follow ``tools/train.py``: ``--work-dir``, ``--resume`` (from the latest checkpoint in
the work dir), ``--amp``, ``--cfg-options key=value ...``. ``--test`` evaluates the config's
``load_from`` checkpoint on its ``test_dataloader`` instead of training (``tools/test.py``).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

from segreward.errors import SegrewardError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segreward.mmseg.train",
                                description="Train an MMSegmentation config with segreward's losses and "
                                            "datasets registered (an equivalent of mmseg's tools/train.py).")
    p.add_argument("config", help="mmseg config file (Python)")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: the config's work_dir, "
                                      "else ./work_dirs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="resume from the latest checkpoint in the work dir (iteration, optimizer, scheduler)")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (GPU)")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override config entries, e.g. train_cfg.max_iters=2000 "
                        "model.decode_head.loss_decode.k=8")
    p.add_argument("--test", action="store_true",
                   help="do not train: evaluate the config's load_from checkpoint on its test_dataloader")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="job launcher; 'pytorch' under torchrun")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def load_config(path: str, work_dir: str | None = None, resume: bool = False, amp: bool = False,
                cfg_options: list[str] | None = None, launcher: str = "none"):
    """The mmengine ``Config`` that :func:`main` trains, with the command-line choices applied."""
    import segreward.mmseg  # noqa: F401  (registers the losses/datasets; clear error without the extra)
    from mmengine.config import Config, DictAction

    if not osp.isfile(path):
        raise SegrewardError(f"{path}: config file not found")
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument("--o", nargs="+", action=DictAction)
        cfg.merge_from_dict(parser.parse_args(["--o", *cfg_options]).o)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(path))[0])
    if amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if resume:
        cfg.resume = True
    return cfg


def train(cfg, test: bool = False):
    """Build mmengine's Runner (or the config's ``runner_type``) and train (or, with ``test``,
    evaluate ``load_from`` on the test set); returns the runner."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if test:
        if not cfg.get("load_from"):
            raise SegrewardError("--test evaluates the config's load_from checkpoint, but load_from is not set; "
                                 "add --cfg-options load_from=PATH")
        if not osp.isfile(cfg.load_from):
            raise SegrewardError(f"--test: checkpoint {cfg.load_from} not found (the config's load_from)")
        cfg.resume = False
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if test:
        runner.test()
    else:
        runner.train()
    return runner


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch.distributed.launch passes --local_rank; torchrun sets LOCAL_RANK itself.
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.work_dir, args.resume, args.amp, args.cfg_options, args.launcher)
        train(cfg, test=args.test)
    except SegrewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
