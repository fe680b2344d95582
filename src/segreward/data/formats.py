"""The public releases' folder layouts: Cityscapes, GTA5, ADE20K, Pascal VOC 2012, CamVid.

Each class only finds the ``(name, image, label)`` pairs of a split and picks its
``DatasetMeta``; loading, label mapping, checks, resizing and caching are
``SegmentationDataset``'s (keywords ``size``, ``transform``, ``cache``, ``mean``, ``std``,
``verify``, ``skip_mismatched`` pass through).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from segreward.data.folder import SegmentationDataset, _listing, _scan, pair_files, read_names, resolve_meta
from segreward.data.meta import DatasetMeta
from segreward.errors import SegrewardError


def _root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise SegrewardError(f"{root}: dataset root not found")
    return root


def _find_below(root: Path, marker: str, candidates: Sequence[str]) -> Path:
    """``root`` or the first of ``root/<candidate>`` that holds ``marker`` (lets users pass a parent)."""
    for sub in ("", *candidates):
        if (root / sub / marker).is_dir():
            return root / sub
    tried = ", ".join(str(root / sub / marker) for sub in ("", *candidates))
    raise SegrewardError(f"{root}: no {marker}/ folder found (tried {tried}); is this the right dataset root?")


def _label_kind(label_type: str, allowed: Sequence[str]) -> str:
    if label_type not in allowed:
        raise SegrewardError(f"label_type={label_type!r}; expected one of {', '.join(allowed)}")
    return label_type


class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/<split>/<city>/``.

    ``label_type``: ``"labelIds"`` (``*_gtFine_labelIds.png``, the raw 34 ids, mapped to the 19
    train ids, everything else ignored), ``"labelTrainIds"`` (``*_gtFine_labelTrainIds.png``
    written by cityscapesscripts' ``createTrainIdLabelImgs``, used as is) or ``"auto"``:
    train-id files when the split has any, otherwise label ids. ``ann_dir="gtCoarse"`` for the
    coarse annotations.
    """

    def __init__(self, root: str | Path, split: str = "train", *, label_type: str = "auto",
                 ann_dir: str = "gtFine", **kwargs):
        root = _root(root)
        kind = _label_kind(label_type, ("auto", "labelIds", "labelTrainIds"))
        imgs, anns = root / "leftImg8bit" / split, root / ann_dir / split
        if kind == "auto":
            has_train_ids = anns.is_dir() and next(anns.rglob(f"*_{ann_dir}_labelTrainIds.png"), None) is not None
            kind = "labelTrainIds" if has_train_ids else "labelIds"
        meta = resolve_meta("cityscapes" if kind == "labelTrainIds" else "cityscapes_labelids")
        self.root, self.split, self.label_type = root, split, kind
        pairs = pair_files(imgs, anns, "_leftImg8bit.png", f"_{ann_dir}_{kind}.png")
        super().__init__(pairs, meta, **kwargs)


class GTA5Dataset(SegmentationDataset):
    """GTA5 (Richter et al. 2016): ``images/*.png`` with ``labels/*.png`` holding Cityscapes label ids.

    The ids are mapped to the 19 Cityscapes train ids (for GTA5 -> Cityscapes adaptation).
    ``split="all"`` (the usual choice) takes every image; any other split is a list of names:
    ``root/<split>.txt`` or a path. ``label_type="labelTrainIds"`` reads MMSegmentation's
    converted ``labels/*_labelTrainIds.png`` instead; ``"auto"`` uses them when present.
    """

    def __init__(self, root: str | Path, split: str = "all", *, label_type: str = "auto", **kwargs):
        root = _root(root)
        kind = _label_kind(label_type, ("auto", "labelIds", "labelTrainIds"))
        if kind == "auto":
            labels = root / "labels"
            kind = "labelTrainIds" if labels.is_dir() and next(labels.glob("*_labelTrainIds.png"), None) else "labelIds"
        names = None
        if split not in (None, "", "all"):
            listed = Path(split) if Path(split).is_file() else root / f"{split}.txt"
            if not listed.is_file():
                raise SegrewardError(f"GTA5 split {split!r}: no list of names at {listed}; use split='all' "
                                     "or write one name (no suffix) per line there")
            names = read_names(listed)
        self.root, self.split, self.label_type = root, split, kind
        if kind == "labelTrainIds":
            meta = resolve_meta("cityscapes")
            pairs = pair_files(root / "images", root / "labels", ".png", "_labelTrainIds.png", names)
        else:
            meta = resolve_meta("gta5")
            pairs = pair_files(root / "images", root / "labels", ".png", ".png", names,
                               ann_exclude=("_labelTrainIds.png",))
        super().__init__(pairs, meta, **kwargs)


class ADE20KDataset(SegmentationDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/<split>/*.jpg``, ``annotations/<split>/*.png``.

    150 classes; raw 0 ("other") is ignored and 1..150 become 0..149 (``reduce_zero_label``).
    ``split``: ``training`` / ``validation`` (``train`` / ``val`` also accepted). ``root`` may
    be ``ADEChallengeData2016`` or the folder above it.
    """

    _ALIASES = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "training", **kwargs):
        root = _find_below(_root(root), "annotations", ("ADEChallengeData2016", "ade/ADEChallengeData2016"))
        split = self._ALIASES.get(split, split)
        self.root, self.split = root, split
        pairs = pair_files(root / "images" / split, root / "annotations" / split, ".jpg", ".png")
        super().__init__(pairs, resolve_meta("ade20k"), **kwargs)


class VOCDataset(SegmentationDataset):
    """Pascal VOC 2012: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs), split lists.

    The PNGs' palette indices are the 21 class ids; 255 (object borders) is ignored. ``split``
    is a name in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``) or a path to a
    list file. ``ann_dir="SegmentationClassAug"`` (with e.g. ``split="path/train_aug.txt"``)
    reads the SBD-augmented labels. ``root`` may be ``VOC2012``, ``VOCdevkit`` or its parent.
    """

    def __init__(self, root: str | Path, split: str = "train", *, ann_dir: str = "SegmentationClass", **kwargs):
        root = _find_below(_root(root), "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"))
        listed = Path(split) if Path(split).is_file() else root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listed.is_file():
            raise SegrewardError(f"VOC split {split!r}: list {listed} not found; expected train, val or trainval")
        self.root, self.split = root, split
        pairs = pair_files(root / "JPEGImages", root / ann_dir, ".jpg", ".png", read_names(listed))
        super().__init__(pairs, resolve_meta("voc"), **kwargs)


# CamVid names: <sequence>_<frame>, e.g. 0001TP_006690, 0006R0_f02310, 0016E5_00390.
_CAMVID_NAME = re.compile(r"^([^_]+)_\D*(\d+)")


def camvid_frame(name: str) -> tuple[str, int]:
    """``(sequence, frame number)`` of a CamVid file name such as ``0006R0_f02310``."""
    m = _CAMVID_NAME.match(Path(name).stem)
    if m is None:
        raise SegrewardError(f"{name}: not a CamVid frame name <sequence>_<frame> (e.g. 0001TP_006690.png)")
    return m.group(1), int(m.group(2))


def camvid_pairs(root: str | Path, split: str = "train") -> list[tuple[str, Path, Path]]:
    """Every ``(name, image, label)`` of a CamVid split (``"train+val"`` joins splits)."""
    root = _root(root)
    pairs = []
    for part in split.split("+"):
        pairs += pair_files(root / part, root / f"{part}annot", ".png", ".png")
    return pairs


def camvid_sequences(root: str | Path, split: str = "train") -> dict[str, int]:
    """``{sequence: number of frames}`` in a CamVid split."""
    return dict(sorted(Counter(camvid_frame(n)[0] for n, _, _ in camvid_pairs(root, split)).items()))


def select_frames(names: Sequence[str], sequences: Sequence[str] | None = None,
                  exclude_sequences: Sequence[str] = (), frames: tuple[float, float] | None = None) -> list[str]:
    """The names kept by a sequence selection and a frame-number range, in input order.

    ``sequences`` / ``exclude_sequences`` are prefixes of the name (``"0001TP"``).
    ``frames=(a, b)`` keeps, within each sequence, the frames of rank ``r`` (0-based, by frame
    number, ``n`` frames) with ``round(a*n) <= r < round(b*n)``: ``(0, 2/3)`` and ``(2/3, 1)``
    split every sequence into two disjoint, consecutive parts that together hold all frames.
    """
    keep = [n for n in names
            if (not sequences or any(n.startswith(s) for s in sequences))
            and not any(n.startswith(s) for s in exclude_sequences)]
    if frames is None:
        return keep
    a, b = (float(f) for f in frames)
    if not 0.0 <= a <= b <= 1.0:
        raise SegrewardError(f"frames={tuple(frames)}: expected two fractions 0 <= start <= end <= 1")
    by_seq: dict[str, list[tuple[int, str]]] = {}
    for n in keep:
        seq, frame = camvid_frame(n)
        by_seq.setdefault(seq, []).append((frame, n))
    chosen = set()
    for items in by_seq.values():
        items.sort()
        lo, hi = math.floor(a * len(items) + 0.5), math.floor(b * len(items) + 0.5)
        chosen.update(n for _, n in items[lo:hi])
    return [n for n in keep if n in chosen]


class CamVidDataset(SegmentationDataset):
    """CamVid, SegNet's 11-class layout: ``<split>/*.png`` with ``<split>annot/*.png`` (ids 0..10, 11 void).

    ``split``: ``train``, ``val``, ``test`` or several joined by ``+`` (``"train+val"``).
    ``sequences`` keeps frames whose name starts with one of these prefixes (the capture
    sequence: ``0001TP`` is dusk, ``0006R0`` and ``0016E5`` are day), ``exclude_sequences``
    drops some, and ``frames=(a, b)`` keeps a part of each sequence by frame number (see
    ``select_frames``), e.g. ``(0, 2/3)`` for tuning and ``(2/3, 1)`` for held-out evaluation.
    Void (11) becomes the ignore index 255. ``label_map="camvid_to_idd"`` reads the labels as IDD
    Lite's 7 classes (for CamVid -> IDD Lite adaptation).
    """

    def __init__(self, root: str | Path, split: str = "train", *, sequences: Sequence[str] | str | None = None,
                 exclude_sequences: Sequence[str] | str = (), frames: tuple[float, float] | None = None,
                 meta: str | DatasetMeta = "camvid", label_map: dict[int, int] | str | None = None, **kwargs):
        root = _root(root)
        if isinstance(sequences, str):
            sequences = [sequences]
        if isinstance(exclude_sequences, str):
            exclude_sequences = [exclude_sequences]
        pairs = camvid_pairs(root, split)
        by_name = {n: (n, i, a) for n, i, a in pairs}
        available = Counter(camvid_frame(n)[0] for n in by_name)
        for s in list(sequences or []) + list(exclude_sequences):
            if not any(seq.startswith(s) for seq in available):
                have = ", ".join(f"{k} ({v})" for k, v in sorted(available.items()))
                raise SegrewardError(f"CamVid {root}/{split}: no frames of sequence {s!r}; sequences there: {have}")
        names = select_frames(sorted(by_name), sequences, exclude_sequences, frames)
        if not names:
            raise SegrewardError(f"CamVid {root}/{split}: the selection sequences={sequences}, "
                                 f"exclude_sequences={list(exclude_sequences)}, frames={frames} keeps no frame")
        self.root, self.split = root, split
        self.sequences = dict(sorted(Counter(camvid_frame(n)[0] for n in names).items()))
        super().__init__([by_name[n] for n in names], resolve_meta(meta, label_map=label_map), **kwargs)

    def frame_numbers(self) -> list[tuple[str, int]]:
        """``(sequence, frame)`` of every sample, in dataset order."""
        return [camvid_frame(n) for n in self.names]


class IDDLiteDataset(SegmentationDataset):
    """IDD Lite (India Driving Dataset, reduced): ``leftImg8bit/<split>/<seq>/<id>_image.jpg`` with
    ``gtFine/<split>/<seq>/<id>_label.png`` (ids 0..6, 255 void), Cityscapes-like.

    Sample names are ``<seq>/<id>``; ``sequences`` / ``exclude_sequences`` keep or drop whole
    sequence folders (frames of one sequence are near duplicates: split by sequence, never by
    frame; :func:`split_sequences` makes such splits). A split without a ``gtFine/<split>`` folder
    (IDD Lite's ``test``) loads unlabelled: every label pixel is the ignore index, e.g. as the
    unlabelled target of pseudo-label adaptation; ``labelled=False`` does so for any split.
    ``names`` keeps just these samples, in this order: a list of ``<seq>/<id>`` or the path of a
    text file with one per line (e.g. the tune / selection / evaluation lists the DA benchmark
    writes).
    """

    def __init__(self, root: str | Path, split: str = "train", *, sequences: Sequence[str] | str | None = None,
                 exclude_sequences: Sequence[str] | str = (), labelled: bool | None = None,
                 names: Sequence[str] | str | Path | None = None, meta: str | DatasetMeta = "idd_lite", **kwargs):
        root = _root(root)
        imgs, anns = root / "leftImg8bit" / split, root / "gtFine" / split
        if labelled is None:
            labelled = anns.is_dir()
        if labelled:
            pairs = pair_files(imgs, anns, "_image.jpg", "_label.png")
        else:
            if not imgs.is_dir():
                raise SegrewardError(f"{imgs}: image folder not found; check the dataset root and split")
            pairs = [(n, p, None) for n, p in sorted(_scan(imgs, "_image.jpg").items())]
            if not pairs:
                raise SegrewardError(f"{imgs}: no images ending in '_image.jpg' (recursively)")
        available = Counter(idd_sequence(n) for n, _, _ in pairs)
        keep = {str(s) for s in ([sequences] if isinstance(sequences, (str, int)) else sequences or [])}
        drop = {str(s) for s in ([exclude_sequences] if isinstance(exclude_sequences, (str, int))
                                 else exclude_sequences)}
        unknown = sorted((keep | drop) - set(available), key=_seq_key)
        if unknown:
            raise SegrewardError(f"IDD Lite {imgs}: no sequence folder(s) {_listing(unknown)}; "
                                 f"{len(available)} there ({_listing(sorted(available, key=_seq_key))})")
        pairs = [p for p in pairs if (not keep or idd_sequence(p[0]) in keep) and idd_sequence(p[0]) not in drop]
        if names is not None:
            wanted = read_names(names) if isinstance(names, (str, Path)) else [str(n) for n in names]
            by_name = {p[0]: p for p in pairs}
            missing = [n for n in wanted if n not in by_name]
            if missing:
                where = f"{names}: " if isinstance(names, (str, Path)) else ""
                raise SegrewardError(f"{where}{len(missing)} name(s) not among the selected IDD Lite frames of {imgs}: "
                                     f"{_listing(missing)} (names are <sequence folder>/<id>, e.g. 0/024541)")
            pairs = [by_name[n] for n in wanted]
        if not pairs:
            raise SegrewardError(f"IDD Lite {imgs}: the selection keeps no frame")
        self.root, self.split, self.labelled = root, split, bool(labelled)
        self.sequences = dict(sorted(Counter(idd_sequence(n) for n, _, _ in pairs).items(),
                                     key=lambda kv: _seq_key(kv[0])))
        super().__init__(pairs, resolve_meta(meta), **kwargs)


def idd_sequence(name: str) -> str:
    """The sequence folder of an IDD Lite sample name ``<seq>/<id>``."""
    return name.split("/", 1)[0] if "/" in name else ""


def _seq_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def idd_sequences(root: str | Path, split: str = "train") -> dict[str, int]:
    """``{sequence folder: number of frames}`` of an IDD Lite split (from the image folder)."""
    imgs = _root(root) / "leftImg8bit" / split
    if not imgs.is_dir():
        raise SegrewardError(f"{imgs}: image folder not found; check the dataset root and split")
    counts = Counter(idd_sequence(n) for n in _scan(imgs, "_image.jpg"))
    return dict(sorted(counts.items(), key=lambda kv: _seq_key(kv[0])))


def split_sequences(counts: dict[str, int], parts: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Split sequences (``{name: frames}``) into named parts of at least the given frame counts.

    The sequences are shuffled once by ``seed``; each part in the order given takes whole
    sequences until it holds at least its number of frames; a part of ``-1`` takes all that is
    left (at most one). No sequence is in two parts, so near-duplicate neighbouring frames never
    straddle a split.
    """
    order = sorted(counts, key=_seq_key)
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    out: dict[str, list[str]] = {}
    rest = [k for k, v in parts.items() if v < 0]
    if len(rest) > 1:
        raise SegrewardError(f"split_sequences: at most one part may take the rest, got {rest}")
    i = 0
    for name, want in parts.items():
        if want < 0:
            continue
        take, got = [], 0
        while got < want and i < len(order):
            take.append(order[i])
            got += counts[order[i]]
            i += 1
        if got < want:
            raise SegrewardError(f"split_sequences: part {name!r} needs {want} frames but only {got} are left")
        out[name] = take
    for name in rest:
        out[name] = order[i:]
    return {k: out[k] for k in parts}


__all__ = ["CityscapesDataset", "GTA5Dataset", "ADE20KDataset", "VOCDataset", "CamVidDataset",
           "camvid_frame", "camvid_pairs", "camvid_sequences", "select_frames", "IDDLiteDataset", "idd_sequence",
           "idd_sequences", "split_sequences"]
