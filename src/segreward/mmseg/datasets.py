"""segreward's datasets as mmseg datasets (``BaseSegDataset`` subclasses with ``METAINFO``).

Classes, palettes and raw-id maps come from :mod:`segreward.data.meta`, so mmseg runs and
segreward runs name and colour classes the same way:

* ``CamVidDataset`` -- SegNet's 11-class CamVid (``train/*.png`` + ``trainannot/*.png``, ids
  0..10, 11 = void). Void is mapped to the ignore index 255 while loading the annotation::

      dict(type='CamVidDataset', data_root='data/CamVid',
           data_prefix=dict(img_path='train', seg_map_path='trainannot'))

* ``IDDLiteDataset`` -- IDD Lite (``leftImg8bit/<split>/<seq>/<id>_image.jpg`` +
  ``gtFine/<split>/<seq>/<id>_label.png``, 7 classes, 255 void)::

      dict(type='IDDLiteDataset', data_root='data/idd_lite',
           data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'))

* ``CamVidIDDDataset`` -- CamVid's frames read as IDD Lite's 7 classes (same layout as
  ``CamVidDataset``), the source of CamVid -> IDD Lite adaptation.

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
    _SUFFIXES = (".png", ".png")

    def __init__(self, img_suffix: str | None = None, seg_map_suffix: str | None = None, **kwargs):
        super().__init__(img_suffix=img_suffix or self._SUFFIXES[0], seg_map_suffix=seg_map_suffix or self._SUFFIXES[1],
                         **kwargs)

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


def register_meta_dataset(type_name: str, meta: DatasetMeta, doc: str = "", img_suffix: str = ".png",
                          seg_map_suffix: str = ".png") -> type:
    """Create and register an mmseg dataset class ``type_name`` for a segreward ``DatasetMeta``
    (file suffixes: the defaults of the class, a config may still override them)."""
    if meta.ignore_index != 255:
        raise ValueError(f"{meta.name}: mmseg datasets use ignore index 255, the meta has {meta.ignore_index}")
    cls = type(type_name, (_MetaDataset,), {
        "METAINFO": _metainfo(meta),
        "_RAW_MAP": _raw_map(meta),
        "_SUFFIXES": (img_suffix, seg_map_suffix),
        "__doc__": doc or f"segreward's {meta.name!r} dataset ({meta.num_classes} classes) for mmseg.",
        "__module__": __name__,
    })
    DATASETS.register_module(name=type_name, module=cls)
    REGISTERED_DATASETS[type_name] = meta.name
    return cls


CamVidDataset = register_meta_dataset(
    "CamVidDataset", get_meta("camvid"),
    "CamVid, SegNet's 11-class layout (``<split>/*.png`` + ``<split>annot/*.png``); void (11) -> 255.")

IDDLiteDataset = register_meta_dataset(
    "IDDLiteDataset", get_meta("idd_lite"),
    "IDD Lite, 7 level-1 classes (``leftImg8bit/<split>/<seq>/*_image.jpg`` + ``gtFine/<split>/<seq>/*_label.png``).",
    img_suffix="_image.jpg", seg_map_suffix="_label.png")

# CamVid's frames with their 11 classes mapped onto IDD Lite's 7 (``label_map: camvid_to_idd``):
# the source of CamVid -> IDD Lite adaptation, named and coloured like IDDLiteDataset.
CamVidIDDDataset = register_meta_dataset(
    "CamVidIDDDataset", get_meta("camvid_idd"),
    "CamVid (SegNet layout) read as IDD Lite's 7 classes: the source of CamVid -> IDD Lite adaptation.")

# The synthetic generator registers its meta when imported; without it, skip the dataset.
SyntheticShiftDataset = None
if importlib.util.find_spec("segreward.data.synthetic") is not None:
    SyntheticShiftDataset = register_meta_dataset(
        "SyntheticShiftDataset", get_meta("synthetic"),
        "segreward's synthetic domain-shift street scenes (``img_dir/<split>``, ``ann_dir/<split>``), "
        "written by ``segreward.data.synthetic.write_mmseg_layout``.")
