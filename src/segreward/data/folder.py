"""Image/label pair datasets: the shared base class and the MMSegmentation folder layout.

``SegmentationDataset`` turns a list of ``(image, label)`` file pairs into a torch ``Dataset``
of ``(image float32 [3,H,W] normalised, label int64 [H,W] train ids, ignore 255)``. Every
format (``formats.py``) only finds its pairs and picks its ``DatasetMeta``; reading, label
mapping, range checks, resizing, caching and normalisation live here, once.

Per item: read (Pillow) -> raw label to train ids (``reduce_zero_label``, then ``label_map``)
-> range check -> optional resize to ``size`` -> optional cache -> optional ``transform`` on
numpy -> tensors. The transform runs after the cache, so random augmentation differs per epoch.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from segreward.data.io import read_image, read_label
from segreward.data.meta import DatasetMeta, get_meta, make_palette, named_label_map
from segreward.errors import SegrewardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
# How many offending names an error message lists before "... and N more".
_SHOW = 5


def _listing(names: Sequence[str], show: int = _SHOW) -> str:
    head = ", ".join(str(n) for n in list(names)[:show])
    return head + (f", ... and {len(names) - show} more" if len(names) > show else "")


def resolve_meta(meta: str | DatasetMeta | None = None, classes: Sequence[str] | int | None = None,
                 *, name: str = "folder", reduce_zero_label: bool | None = None,
                 label_map: dict[int, int] | str | None = None, ignore_index: int | None = None) -> DatasetMeta:
    """A ``DatasetMeta`` from a known name, an explicit meta, or a class list / count, with overrides.

    ``label_map`` is a mapping ``{raw id: train id}`` or the name of a known map
    (``"camvid_to_idd"``), which also brings the classes and palette it maps onto.
    """
    if isinstance(meta, str):
        meta = get_meta(meta)
    if isinstance(label_map, str):
        if classes is not None:
            raise SegrewardError(f"label_map={label_map!r} brings its own classes; drop classes=")
        meta = named_label_map(label_map, None if meta is None else meta.name)
        label_map = None
    if meta is None:
        if classes is None:
            raise SegrewardError(
                "a folder dataset needs its classes: pass meta='cityscapes' (or another known name, "
                "or a DatasetMeta) or classes=['road', 'car', ...] (or the number of classes)")
        if isinstance(classes, int):
            if classes < 1:
                raise SegrewardError(f"classes={classes}: the number of classes must be at least 1")
            classes = tuple(f"class{i}" for i in range(classes))
        meta = DatasetMeta(name, tuple(classes), make_palette(len(classes)))
    elif classes is not None:
        raise SegrewardError("give either meta or classes, not both")
    changes = {}
    if reduce_zero_label is not None:
        changes["reduce_zero_label"] = bool(reduce_zero_label)
    if label_map is not None:
        changes["label_map"] = {int(k): int(v) for k, v in label_map.items()}
    if ignore_index is not None:
        changes["ignore_index"] = int(ignore_index)
    return dataclasses.replace(meta, **changes) if changes else meta


def read_names(names: Sequence[str] | str | Path) -> list[str]:
    """A list of sample names, or the non-empty lines of a text file (one name per line)."""
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise SegrewardError(f"{path}: list of names not found")
        out = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not out:
            raise SegrewardError(f"{path}: list of names is empty")
        return out
    return [str(n) for n in names]


def _scan(folder: Path, suffix: str, exclude: Sequence[str] = ()) -> dict[str, Path]:
    """``{relative name without suffix: path}`` for files under ``folder`` (recursive) ending in ``suffix``."""
    found = {}
    for path in folder.rglob(f"*{suffix}"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(rel.endswith(x) for x in exclude):
            found[rel[: -len(suffix)] if suffix else rel] = path
    return found


def pair_files(img_dir: str | Path, ann_dir: str | Path, img_suffix: str, seg_map_suffix: str,
               names: Sequence[str] | None = None, ann_exclude: Sequence[str] = ()) -> list[tuple[str, Path, Path]]:
    """``(name, image, label)`` triples, sorted by name, matched by relative path minus suffix.

    Without ``names`` both folders are scanned (recursively) and every image must have a label
    and every label an image. With ``names`` just those samples are taken (``ann_dir`` may hold
    more). Errors name the folder, the suffix and a few of the offending names.
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for folder, what in ((img_dir, "image"), (ann_dir, "label")):
        if not folder.is_dir():
            raise SegrewardError(f"{folder}: {what} folder not found; check the dataset root and split")
    if names is not None:
        pairs = [(n, img_dir / f"{n}{img_suffix}", ann_dir / f"{n}{seg_map_suffix}") for n in names]
        no_img = [f"{n}{img_suffix}" for n, i, _ in pairs if not i.is_file()]
        no_ann = [f"{n}{seg_map_suffix}" for n, _, a in pairs if not a.is_file()]
        if no_img:
            raise SegrewardError(f"{len(no_img)} listed image(s) missing in {img_dir}: {_listing(no_img)}")
        if no_ann:
            raise SegrewardError(f"{len(no_ann)} listed image(s) have no label in {ann_dir}: {_listing(no_ann)}")
        if not pairs:
            raise SegrewardError(f"the list of names for {img_dir} is empty")
        return sorted(pairs)
    images = _scan(img_dir, img_suffix)
    labels = _scan(ann_dir, seg_map_suffix, ann_exclude)
    if not images:
        raise SegrewardError(f"{img_dir}: no images ending in {img_suffix!r} (recursively); "
                             "check the folder and img_suffix")
    no_ann = sorted(set(images) - set(labels))
    no_img = sorted(set(labels) - set(images))
    if no_ann:
        raise SegrewardError(
            f"{len(no_ann)} image(s) in {img_dir} have no label {ann_dir}/<name>{seg_map_suffix}: "
            f"{_listing([n + img_suffix for n in no_ann])}; check seg_map_suffix or remove them")
    if no_img:
        raise SegrewardError(
            f"{len(no_img)} label(s) in {ann_dir} have no image {img_dir}/<name>{img_suffix}: "
            f"{_listing([n + seg_map_suffix for n in no_img])}; check img_suffix or remove them")
    return [(n, images[n], labels[n]) for n in sorted(images)]


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise SegrewardError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SegrewardError(f"{path}: cannot read image ({e}); is the file corrupt or not an image?") from None


class SegmentationDataset(Dataset):
    """Image/label pairs as ``(image float32 [3,H,W], label int64 [H,W])`` (train ids, ignore 255).

    Args:
        pairs: ``(name, image_path, label_path)`` triples.
        meta: classes, palette, ignore index, ``reduce_zero_label`` and ``label_map`` (raw -> train id).
        size: ``(H, W)`` to resize every item to (image bilinear, label nearest); ``None`` keeps it.
        transform: ``fn(image uint8 [H,W,3], label [H,W]) -> (image, label)`` on numpy, applied
            after the cache. Its image may be uint8 or float, with values on the 0-255 scale.
        cache: keep the decoded, mapped, resized arrays in memory (each DataLoader worker keeps
            its own copy); ``preload()`` fills it up front.
        mean, std: per-channel normalisation ``(image/255 - mean) / std`` (ImageNet by default;
            ``(0, 0, 0)`` and ``(1, 1, 1)`` give plain [0, 1] values); values above 1 are read
            on the 0-255 scale, as MMSegmentation configs write them (123.675, ...).
        verify: on load, read every file header and check that it is an image and that image
            and label sizes agree (errors name the files). Label values are checked per item.
        skip_mismatched: drop (with a warning) pairs whose sizes differ instead of raising.
        label_palette: colour -> id for RGB colour-coded label PNGs (see ``io.read_label``).
    """

    def __init__(self, pairs: Iterable[tuple[str, Path, Path]], meta: DatasetMeta, *,
                 size: tuple[int, int] | None = None, transform: Transform | None = None,
                 cache: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, verify: bool = True, skip_mismatched: bool = False,
                 label_palette=None):
        self.meta = meta
        # A label path of None is an unlabelled image: its label is all ignore_index.
        self.samples = [(str(n), Path(i), None if a is None else Path(a)) for n, i, a in pairs]
        if not self.samples:
            raise SegrewardError(f"{type(self).__name__}: no samples")
        if size is not None:
            size = tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise SegrewardError(f"size={size}: expected (height, width), both positive")
        self.size = size
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        m, s = np.asarray(mean, dtype=np.float32).ravel(), np.asarray(std, dtype=np.float32).ravel()
        if m.size != 3 or s.size != 3 or (s <= 0).any():
            raise SegrewardError(f"mean={tuple(mean)}, std={tuple(std)}: expected 3 values each, std > 0")
        # Kept on the 0-255 scale of the pixels; 0-1 values (ImageNet's 0.485, ...) are scaled up,
        # 0-255 values as MMSegmentation configs write them (123.675, ...) are used as given.
        if m.max() <= 1.0 and s.max() <= 1.0:
            m, s = m * 255.0, s * 255.0
        self.mean, self.std = m.reshape(3, 1, 1), s.reshape(3, 1, 1)
        self.label_palette = label_palette
        self._lut = meta.lut()
        if verify:
            self._verify(skip_mismatched)

    # ----------------------------------------------------------------- loading checks
    def _verify(self, skip_mismatched: bool) -> None:
        bad, keep = [], []
        for name, img, ann in tqdm(self.samples, desc=f"checking {self.meta.name}", unit="pair",
                                   disable=len(self.samples) < 500, leave=False):
            wi, hi = _header_size(img)
            if ann is None:
                keep.append((name, img, ann))
                continue
            wa, ha = _header_size(ann)
            if (wi, hi) != (wa, ha):
                bad.append(f"{img} is {wi}x{hi} but its label {ann} is {wa}x{ha}")
            else:
                keep.append((name, img, ann))
        if bad and not skip_mismatched:
            raise SegrewardError(f"{len(bad)} image/label size mismatch(es) (width x height): "
                                 + "; ".join(bad[:_SHOW]) + (f"; ... and {len(bad) - _SHOW} more" if len(bad) > _SHOW else "")
                                 + "; fix or remove them, or pass skip_mismatched=True")
        if bad:
            warnings.warn(f"skipped {len(bad)} pair(s) whose image and label sizes differ: {bad[0]}", stacklevel=3)
            self.samples = keep
            if not keep:
                raise SegrewardError("every image/label pair has mismatched sizes; nothing left")

    def to_train_ids(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """Raw label values -> train ids (``reduce_zero_label``, then ``label_map``), range-checked."""
        meta, ignore = self.meta, self.meta.ignore_index
        label = raw.astype(np.int64)
        if meta.reduce_zero_label:
            # 0 ("other") becomes ignore; 1..N -> 0..N-1; an ignore value stays ignore.
            is_ignore = label == ignore
            label = label - 1
            label[(label == -1) | is_ignore] = ignore
        if self._lut is not None:
            if label.min(initial=0) < 0 or label.max(initial=0) >= len(self._lut):
                bad = np.unique(label[(label < 0) | (label >= len(self._lut))])
                raise SegrewardError(f"{path}: label values {bad[:10].tolist()} outside the label map's range "
                                     f"0..{len(self._lut) - 1}")
            label = self._lut[label]
        out = (label != ignore) & ((label < 0) | (label >= meta.num_classes))
        if out.any():
            bad = np.unique(label[out])
            raise SegrewardError(
                f"{path}: label values {bad[:10].tolist()}{' ...' if bad.size > 10 else ''} out of range: "
                f"{meta.name} has {meta.num_classes} classes (0..{meta.num_classes - 1}) and ignore index "
                f"{ignore}; wrong dataset format, or a missing label_map / reduce_zero_label?")
        small = 0 <= ignore <= 255 and meta.num_classes <= 256
        return label.astype(np.uint8 if small else np.int32)

    # ----------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.samples]

    def load_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded, mapped and resized ``(image uint8 [H,W,3], label [H,W])`` of one sample."""
        if index in self._cache:
            return self._cache[index]
        _, img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        if ann_path is None:
            label = np.full(image.shape[:2], self.meta.ignore_index,
                            dtype=np.uint8 if 0 <= self.meta.ignore_index <= 255 else np.int32)
        else:
            label = self.to_train_ids(read_label(ann_path, self.label_palette), ann_path)
        if image.shape[:2] != label.shape:
            raise SegrewardError(f"{img_path} is {image.shape[1]}x{image.shape[0]} but its label {ann_path} "
                                 f"is {label.shape[1]}x{label.shape[0]} (width x height)")
        if self.size is not None and image.shape[:2] != self.size:
            h, w = self.size
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
            mode = "L" if label.dtype == np.uint8 else "I"
            label = np.asarray(Image.fromarray(label.astype(np.uint8 if mode == "L" else np.int32), mode)
                               .resize((w, h), Image.NEAREST)).astype(label.dtype)
        if self.cache:
            self._cache[index] = (image, label)
        return image, label

    def preload(self, progress: bool = True) -> "SegmentationDataset":
        """Decode every sample into the cache now (and check every label's values)."""
        self.cache = True
        for i in tqdm(range(len(self)), desc=f"loading {self.meta.name}", unit="img", disable=not progress):
            self.load_arrays(i)
        return self

    def check_labels(self, progress: bool = True) -> None:
        """Read every label and raise on values out of range (otherwise checked when an item is read)."""
        for _, _, ann in tqdm(self.samples, desc=f"checking labels of {self.meta.name}", unit="img",
                              disable=not progress):
            if ann is not None:
                self.to_train_ids(read_label(ann, self.label_palette), ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load_arrays(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
        chw = (chw - self.mean) / self.std
        return torch.from_numpy(chw), torch.from_numpy(np.asarray(label, dtype=np.int64))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.meta.name}, {len(self)} samples, {self.meta.num_classes} classes"
                f"{'' if self.size is None else f', size={self.size}'})")


class FolderDataset(SegmentationDataset):
    """The MMSegmentation folder layout, for your own data.

    ``root/img_dir/<split>/**/<name><img_suffix>`` with labels at
    ``root/ann_dir/<split>/**/<name><seg_map_suffix>`` (``split=None``: no split level).
    ``names`` (a list or a text file, one name per line, relative to the split folder, no
    suffix) restricts the samples, like MMSegmentation's ``ann_file``. Classes come from
    ``meta`` (a known name or a ``DatasetMeta``) or ``classes`` (names or a count);
    ``reduce_zero_label`` and ``label_map`` override the meta's. Other keywords go to
    ``SegmentationDataset``.
    """

    def __init__(self, root: str | Path, split: str | None = None, *, img_dir: str = "img_dir",
                 ann_dir: str = "ann_dir", img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 meta: str | DatasetMeta | None = None, classes: Sequence[str] | int | None = None,
                 reduce_zero_label: bool | None = None, label_map: dict[int, int] | None = None,
                 names: Sequence[str] | str | Path | None = None, **kwargs):
        root = Path(root)
        if not root.is_dir():
            raise SegrewardError(f"{root}: dataset root not found")
        meta = resolve_meta(meta, classes, reduce_zero_label=reduce_zero_label, label_map=label_map)
        imgs, anns = root / img_dir, root / ann_dir
        if split:
            imgs, anns = imgs / split, anns / split
        self.root, self.split = root, split
        if isinstance(names, (str, Path)) and not Path(names).is_file() and (root / names).is_file():
            names = root / names  # a list file given relative to the dataset root
        pairs = pair_files(imgs, anns, img_suffix, seg_map_suffix, None if names is None else read_names(names))
        super().__init__(pairs, meta, **kwargs)
