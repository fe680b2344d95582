"""Class names, palettes, ignore index and raw-id -> train-id maps of known datasets.

``get_meta(name)`` is how the stats tool, the datasets and the CLI find a dataset's defaults
(``cityscapes``, ``gta5``, ``camvid``, ``ade20k``, ``voc``, ``synthetic``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from segreward.errors import SegrewardError


@dataclass(frozen=True)
class DatasetMeta:
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255
    reduce_zero_label: bool = False
    # raw label value -> train id; values not listed map to ignore_index when ``map_unlisted``.
    label_map: dict[int, int] | None = field(default=None)
    map_unlisted: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lut(self, size: int = 65536) -> np.ndarray | None:
        """A lookup table ``raw -> train id`` (``None`` when labels are already train ids)."""
        return build_lut(self.label_map, self.ignore_index, self.map_unlisted, size)


def build_lut(label_map: dict[int, int] | None, ignore_index: int = 255, map_unlisted: bool = False,
              size: int = 65536) -> np.ndarray | None:
    if label_map is None:
        return None
    lut = np.full(size, ignore_index, dtype=np.int64) if map_unlisted else np.arange(size, dtype=np.int64)
    for raw, train in label_map.items():
        lut[int(raw)] = int(train)
    return lut


CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                      (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# Cityscapes labelIds (also GTA5's label ids) -> the 19 train ids; every other id is ignored.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                            23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))

# IDD Lite (India Driving Dataset, reduced: 320x227 frames): IDD's 7 level-1 classes, 255 void.
IDD_LITE_CLASSES = ("drivable", "non-drivable", "living things", "vehicles", "road-side objects", "far objects",
                    "sky")
IDD_LITE_PALETTE = ((128, 64, 128), (244, 35, 232), (220, 20, 60), (0, 0, 142), (250, 170, 30), (70, 70, 70),
                    (70, 130, 180))
# CamVid's 11 classes (raw ids of SegNet's layout, 11 = void) onto IDD Lite's 7: Road -> drivable,
# Pavement -> non-drivable, Pedestrian + Bicyclist -> living things, Car -> vehicles, Pole +
# SignSymbol + Fence -> road-side objects, Building + Tree -> far objects, Sky -> sky.
CAMVID_TO_IDD = {0: 6, 1: 5, 2: 4, 3: 0, 4: 1, 5: 5, 6: 4, 7: 4, 8: 3, 9: 2, 10: 2, 11: 255}


def make_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` distinct display colours, the Pascal VOC way: the bits of the id spread over R, G, B."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


# ADE20K SceneParsing (ADEChallengeData2016): raw 0 = "other", reduced away; 1..150 -> 0..149.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")
assert len(ADE20K_CLASSES) == 150
# A generated display palette (not the official colour150 table): ids 1..150 of the VOC scheme.
ADE20K_PALETTE = make_palette(151)[1:]

# Pascal VOC 2012: palette PNGs whose indices are the ids; 255 marks object borders (ignored).
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
VOC_PALETTE = make_palette(21)

_REGISTRY: dict[str, DatasetMeta] = {}
# Metas registered by a module on import, loaded the first time they are asked for.
_LAZY = {"synthetic": "segreward.data.synthetic"}


def register_meta(meta: DatasetMeta) -> DatasetMeta:
    _REGISTRY[meta.name] = meta
    return meta


register_meta(DatasetMeta("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE))
register_meta(DatasetMeta("cityscapes_labelids", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
                          label_map=CITYSCAPES_ID_TO_TRAINID, map_unlisted=True))
register_meta(DatasetMeta("gta5", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
                          label_map=CITYSCAPES_ID_TO_TRAINID, map_unlisted=True))
# CamVid (SegNet 11-class version): id 11 is void, mapped to the ignore index.
register_meta(DatasetMeta("camvid", CAMVID_CLASSES, CAMVID_PALETTE, label_map={11: 255}))
register_meta(DatasetMeta("idd_lite", IDD_LITE_CLASSES, IDD_LITE_PALETTE))
# CamVid's raw label ids read as IDD Lite's 7 classes (``label_map: camvid_to_idd``).
register_meta(DatasetMeta("camvid_idd", IDD_LITE_CLASSES, IDD_LITE_PALETTE, label_map=CAMVID_TO_IDD))
register_meta(DatasetMeta("ade20k", ADE20K_CLASSES, ADE20K_PALETTE, reduce_zero_label=True))
register_meta(DatasetMeta("voc", VOC_CLASSES, VOC_PALETTE))


# Named label maps (``label_map: NAME`` in a dataset spec): the map and the meta whose classes it
# produces. ``source`` is the meta whose raw ids it reads.
LABEL_MAPS: dict[str, tuple[str, str]] = {"camvid_to_idd": ("camvid", "camvid_idd")}


def named_label_map(name: str, source: str | None = None) -> DatasetMeta:
    """The meta of a named label map (classes, palette and raw-id map of its target classes).

    ``source``: the meta name of the dataset it is applied to; a map made for another dataset's
    raw ids is refused (CamVid's map on Cityscapes ids would relabel silently).
    """
    key = str(name).lower()
    if key not in LABEL_MAPS:
        raise SegrewardError(f"label_map={name!r}: unknown named label map; known: {', '.join(sorted(LABEL_MAPS))} "
                             "(or give a mapping {raw id: train id})")
    reads, meta = LABEL_MAPS[key]
    if source is not None and source != reads:
        raise SegrewardError(f"label_map={name!r} maps {reads} label ids; this dataset's labels are {source}'s")
    return get_meta(meta)


def get_meta(name: str) -> DatasetMeta:
    key = name.lower()
    if key not in _REGISTRY and key in _LAZY:
        try:
            importlib.import_module(_LAZY[key])
        except ModuleNotFoundError as e:
            if e.name != _LAZY[key]:
                raise
    if key not in _REGISTRY:
        raise SegrewardError(f"unknown dataset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def known_datasets() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))
