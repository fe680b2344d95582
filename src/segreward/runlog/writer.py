"""Write a run's scalars the way mmengine's ``LocalVisBackend`` does.

One JSON object per line in ``<run_dir>/vis_data/scalars.json``, appended and flushed line by
line, so a killed run leaves at most one truncated last line (which the reader skips with a
warning). Training lines hold ``lr`` first, then the other scalars (``loss``, its parts, ...),
then ``iter``, ``memory`` (when given) and ``step``; validation lines hold the metrics then
``step`` -- the same key order as mmengine's ``LogProcessor``. Non-finite values are written
as ``NaN``/``Infinity``/``-Infinity``, as Python's :mod:`json` (and mmengine) do; Python's
``json.loads`` and :func:`segreward.runlog.read_scalars` read them back.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

from segreward.errors import SegrewardError
from segreward.runlog._keys import is_train_key

_MODES = ("train", "val", "test")
# Keys that the writer places itself, at the end of a training line.
_TAIL_KEYS = ("epoch", "iter", "memory", "step")


def _to_number(key: str, value, path: Path):
    """A Python int/float from a number, a 0-d tensor or a numpy scalar."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # torch / numpy scalars
    if item is not None:
        try:
            return _to_number(key, item(), path)
        except (ValueError, RuntimeError):
            pass
    raise SegrewardError(
        f"{path}: scalar {key!r} has value {value!r} of type {type(value).__name__}; "
        "log only numbers (int, float, a one-element tensor)"
    )


class RunWriter:
    """Append scalars to ``<run_dir>/vis_data/scalars.json`` (and TensorBoard events).

    >>> with RunWriter("runs/exp1") as w:                       # doctest: +SKIP
    ...     w.log(50, {"lr": 0.01, "loss": 0.7, "decode.loss_ce": 0.7})
    ...     w.log(1000, {"aAcc": 91.0, "mIoU": 55.2, "mAcc": 66.1}, mode="val")

    Args:
        run_dir: the run directory; ``vis_data/`` is created inside it.
        tensorboard: also write TensorBoard event files into ``vis_data/`` (needs the
            ``tensorboard`` package; tags are the plain keys, as mmengine's
            ``TensorboardVisBackend`` writes them).

    A resumed run may reuse the same ``run_dir``: lines are appended, and readers keep the
    last line per step. If the previous process died mid-line, a newline is written first so
    the broken line stays on its own.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.vis_dir = self.run_dir / "vis_data"
        self.path = self.vis_dir / "scalars.json"
        try:
            self.vis_dir.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise SegrewardError(f"{self.path}: cannot open the run log for writing ({e}); "
                                 "check that the run directory is writable") from e
        if needs_newline:
            self._file.write("\n")
            self._file.flush()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._file.close()
                raise SegrewardError(
                    "RunWriter(tensorboard=True) needs the tensorboard package: "
                    "pip install 'segreward[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(log_dir=str(self.vis_dir))

    def log(self, step: int, scalars: dict, mode: str = "train") -> dict:
        """Write one line; returns the dict as written (key order included).

        ``mode="train"``: a training line; ``iter`` defaults to ``step``.
        ``mode="val"`` (or ``"test"``): a validation line; it must not carry training keys
        (``loss*``, ``lr``, ``iter``, ...), else readers would take it for a training line.
        """
        if self._file is None:
            raise SegrewardError(f"{self.path}: RunWriter is closed; open a new one to log more")
        if mode not in _MODES:
            raise SegrewardError(f"RunWriter.log: mode={mode!r} is not one of {_MODES}")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise SegrewardError(f"{self.path}: step must be an int, got {step!r}")
        values = {str(k): _to_number(str(k), v, self.path) for k, v in scalars.items()}
        if "step" in values:
            raise SegrewardError(f"{self.path}: pass the step as the `step` argument, "
                                 "not as a scalar named 'step'")
        step = int(step)
        if mode == "train":
            line = {}
            for k in sorted((k for k in values if k.endswith("lr")), key=lambda k: k != "base_lr"):
                line[k] = values[k]  # base_lr, lr, ... first, as mmengine does
            for k, v in values.items():
                if k not in line and k not in _TAIL_KEYS:
                    line[k] = v
            if "epoch" in values:
                line["epoch"] = int(values["epoch"])
            line["iter"] = int(values.get("iter", step))
            if "memory" in values:
                line["memory"] = values["memory"]
        else:
            bad = [k for k in values if is_train_key(k)]
            if bad:
                raise SegrewardError(
                    f"{self.path}: validation line at step {step} has training key(s) {bad}; "
                    "readers tell train from validation lines by these keys, so rename them "
                    "(e.g. 'val_loss' is fine, 'loss' or 'loss_val' is not)"
                )
            line = dict(values)
        line["step"] = step
        # allow_nan=True writes NaN / Infinity / -Infinity, exactly as mmengine's dump does.
        self._file.write(json.dumps(line, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in line.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return line

    def close(self) -> None:
        """Flush and close the files; further :meth:`log` calls raise."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() is the contract
        try:
            self.close()
        except Exception:
            pass

