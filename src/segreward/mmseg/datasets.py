"""segreward's datasets as mmseg datasets (``BaseSegDataset`` subclasses with ``METAINFO``).

Classes, palettes and raw-id maps come from :mod:`segreward.data.meta`, so mmseg runs and
segreward runs name and colour classes the same way:

* ``CamVidDataset`` -- SegNet's 11-class CamVid (``train/*.png`` + ``trainannot/*.png``, ids
  0..10, 11 = void). Void is mapped to the ignore index 255 while loading the annotation::

      dict(type='CamVidDataset', data_root='data/CamVid',
           data_prefix=dict(img_path='train', seg_map_path='trainannot'))

* ``SyntheticShiftDataset`` -- the synthetic domain-shift scenes, written in mmseg's layout by
  ``segreward.data.synthetic.write_mmseg_layout`` (``img_dir/<split>``, ``ann_dir/<split>``).
"""

from __future__ import annotations

import importlib.util

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from segreward.data.meta import DatasetMeta, get_meta

# mmseg dataset type -> segreward dataset name, for every dataset registered here.
REGISTERED_DATASETS: dict[str, str] = {}


def _metainfo(meta: DatasetMeta) -> dict:
    return dict(classes=tuple(meta.classes), palette=[list(c) for c in meta.palette])


def _raw_map(meta: DatasetMeta) -> dict[int, int] | None:
    """The meta's raw-id map as the dict mmseg's ``LoadAnnotations`` applies (8-bit labels)."""
    if meta.label_map is None:
        return None
    lut = meta.lut(256)
    return {raw: int(lut[raw]) for raw in range(256) if lut[raw] != raw}


class _MetaDataset(BaseSegDataset):
    """A ``BaseSegDataset`` whose label map first applies the dataset's raw-id map (``_RAW_MAP``)
    and then mmseg's own class-subset map (``metainfo=dict(classes=[...])``)."""

    _RAW_MAP: dict[int, int] | None = None

    def __init__(self, img_suffix: str = ".png", seg_map_suffix: str = ".png", **kwargs):
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)

    @classmethod
    def get_label_map(cls, new_classes=None):
        subset = super().get_label_map(new_classes)
        if not cls._RAW_MAP:
            return subset
        # mmseg maps each pixel once, from a copy of the raw label: compose both maps.
        composed = dict(subset or {})
        for raw, train_id in cls._RAW_MAP.items():
            composed[raw] = train_id if subset is None or train_id == 255 else subset.get(train_id, train_id)
        return composed


def register_meta_dataset(type_name: str, meta: DatasetMeta, doc: str = "") -> type:
    """Create and register an mmseg dataset class ``type_name`` for a segreward ``DatasetMeta``."""
    if meta.ignore_index != 255:
        raise ValueError(f"{meta.name}: mmseg datasets use ignore index 255, the meta has {meta.ignore_index}")
    cls = type(type_name, (_MetaDataset,), {
        "METAINFO": _metainfo(meta),
        "_RAW_MAP": _raw_map(meta),
        "__doc__": doc or f"segreward's {meta.name!r} dataset ({meta.num_classes} classes) for mmseg.",
        "__module__": __name__,
    })
    DATASETS.register_module(name=type_name, module=cls)
    REGISTERED_DATASETS[type_name] = meta.name
    return cls


CamVidDataset = register_meta_dataset(
    "CamVidDataset", get_meta("camvid"),
    "CamVid, SegNet's 11-class layout (``<split>/*.png`` + ``<split>annot/*.png``); void (11) -> 255.")

# The synthetic generator registers its meta when imported; without it, skip the dataset.
SyntheticShiftDataset = None
if importlib.util.find_spec("segreward.data.synthetic") is not None:
    SyntheticShiftDataset = register_meta_dataset(
        "SyntheticShiftDataset", get_meta("synthetic"),
        "segreward's synthetic domain-shift street scenes (``img_dir/<split>``, ``ann_dir/<split>``), "
        "written by ``segreward.data.synthetic.write_mmseg_layout``.")
