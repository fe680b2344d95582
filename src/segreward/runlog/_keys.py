"""How a logged key is classified: training key or validation key.

mmengine writes training and validation scalars into the same ``scalars.json`` without a
"mode" field, so a reader has to tell them apart by their keys. The rule (also used by
:class:`~segreward.runlog.RunWriter` to refuse ambiguous validation lines):

* a key with a ``train/`` prefix (``log_with_hierarchy=True``) is a training key, one with a
  ``val/`` or ``test/`` prefix is not;
* otherwise ``iter``, ``epoch``, ``memory``, ``grad_norm``, any key whose last name ends in
  ``lr`` (``lr``, ``base_lr``, ``backbone.lr``) and any key whose last dotted part starts with
  ``loss`` (``loss``, ``decode.loss_ce``, ``aux.loss_dice``) is a training key.

A line is a *training* line when it carries at least one training key, else a *validation*
line. ``step``, ``time`` and ``data_time`` appear in both kinds and decide nothing.
"""

from __future__ import annotations

import functools

# Keys written in both kinds of line; they never decide the kind.
SHARED_KEYS = frozenset({"step", "time", "data_time"})
_TRAIN_NAMES = frozenset({"iter", "epoch", "memory", "grad_norm"})
_HIER_TRAIN = ("train/",)
_HIER_EVAL = ("val/", "test/")


@functools.lru_cache(maxsize=4096)
def is_train_key(key: str) -> bool:
    """True when ``key`` only ever appears in mmengine's training lines."""
    if key.startswith(_HIER_TRAIN):
        return True
    if key.startswith(_HIER_EVAL):
        return False
    if key in _TRAIN_NAMES:
        return True
    last = key.rsplit("/", 1)[-1]
    if last.endswith("lr"):
        return True
    return last.rsplit(".", 1)[-1].startswith("loss")


def is_train_line(keys) -> bool:
    """True when a line with these keys is a training line (see module docstring)."""
    return any(is_train_key(k) for k in keys)


def strip_mode_prefix(key: str) -> str:
    """``train/loss`` -> ``loss``, ``val/mIoU`` -> ``mIoU`` (mmengine ``log_with_hierarchy``)."""
    for prefix in _HIER_TRAIN + _HIER_EVAL:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key
