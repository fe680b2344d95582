"""Datasets by short name: ``build_dataset("camvid", root, "train", size=(96, 128))``.

Every dataset yields ``(image float32 [3,H,W] normalised, label int64 [H,W])`` with train ids
and ignore index 255, and has a ``meta`` (``DatasetMeta``). The classes live in ``folder``
(the base class and the MMSegmentation folder layout) and ``formats`` (the public releases).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from segreward.data.folder import (IMAGENET_MEAN, IMAGENET_STD, FolderDataset, SegmentationDataset,
                                   pair_files, read_names, resolve_meta)
from segreward.data.formats import (ADE20KDataset, CamVidDataset, CityscapesDataset, GTA5Dataset, IDDLiteDataset,
                                    VOCDataset, camvid_frame, camvid_sequences, idd_sequences, select_frames,
                                    split_sequences)
from segreward.errors import SegrewardError

DATASETS: dict[str, type[SegmentationDataset]] = {
    "folder": FolderDataset,
    "mmseg": FolderDataset,
    "cityscapes": CityscapesDataset,
    "gta5": GTA5Dataset,
    "ade20k": ADE20KDataset,
    "voc": VOCDataset,
    "camvid": CamVidDataset,
    "idd_lite": IDDLiteDataset,
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def build_dataset(name: str, root: str | Path, split: str | None = None, **kwargs) -> SegmentationDataset:
    """A dataset by short name (``folder``/``mmseg``, ``cityscapes``, ``gta5``, ``ade20k``, ``voc``,
    ``camvid``, ``idd_lite``); ``split=None`` takes the format's default; keywords go to its class."""
    key = name.lower()
    if key not in DATASETS:
        raise SegrewardError(f"unknown dataset format {name!r}; known: {', '.join(dataset_names())}")
    cls = DATASETS[key]
    allowed = _keywords(cls)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise SegrewardError(f"dataset {name!r}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(allowed))}")
    return cls(root, **kwargs) if split is None else cls(root, split, **kwargs)


def _keywords(cls: type) -> set[str]:
    """The keyword names a dataset class accepts (its own and those of its bases it passes on)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "root", "split", "pairs"):
                names.add(p.name)
        if klass is SegmentationDataset:
            break
    return names


__all__ = ["DATASETS", "build_dataset", "dataset_names", "SegmentationDataset", "FolderDataset",
           "CityscapesDataset", "GTA5Dataset", "ADE20KDataset", "VOCDataset", "CamVidDataset",
           "IMAGENET_MEAN", "IMAGENET_STD", "pair_files", "read_names", "resolve_meta",
           "camvid_frame", "camvid_sequences", "select_frames", "IDDLiteDataset", "idd_sequences",
           "split_sequences"]
