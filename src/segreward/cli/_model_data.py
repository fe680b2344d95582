"""The MODEL and DATA arguments shared by ``segreward calibrate`` and ``segreward evaluate``
(resolved by :mod:`segreward.engine.resolve`)."""

from __future__ import annotations

DATA_HELP = ("MODEL is a run directory of `segreward train` or a weights file written by it; DATA is a dataset "
             "spec YAML (see configs/data/, e.g. `type: camvid`, `root: ...`, `split: val`), a run config (its "
             "first data.val set, a data.val name or data.train with --split), or a folder in the mmseg layout "
             "(img_dir/, ann_dir/).")


def add_model_data_arguments(p) -> None:
    """MODEL, DATA, --split, --format, --classes, --size, --batch-size, --device, --no-progress."""
    p.add_argument("model", metavar="MODEL", help="run directory (model.safetensors) or weights file")
    p.add_argument("data", metavar="DATA", help="dataset spec YAML, run config YAML, or mmseg-layout folder")
    p.add_argument("--split", help="split of a folder / dataset spec; with a run config: 'train' or a data.val name")
    p.add_argument("--format", default="folder", help="dataset format of a DATA folder (default: folder; "
                                                      "camvid, cityscapes, ...)")
    p.add_argument("--classes", help="classes of a DATA folder in the mmseg layout (default: the model's): a known "
                   "dataset (cityscapes, camvid, ...), a number, or comma-separated names")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images and labels (a DATA folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
