"""Pixels per class over a folder of label maps: one histogram per image, worker processes.

The per-image pipeline, in this order (the same order as MMSegmentation's ``LoadAnnotations``):

1. read the label map with :func:`segreward.data.io.read_label` (8-bit ``L``, palette ``P``
   indices, 16-bit); an RGB colour-coded map only with a ``palette`` (colour -> id), and
   colours missing from the palette become the value ``-1`` (reported as unknown);
2. histogram of the raw values (a run-length histogram: label maps are piecewise constant,
   so counting run ends is several times faster than ``np.bincount`` over every pixel);
3. ``reduce_zero_label``: raw 0 -> ignored, raw values equal to an ignore index stay ignored,
   every other value v -> v - 1;
4. ``label_map`` (raw id -> train id); unlisted values stay unchanged, or are ignored when
   ``map_unlisted`` is true;
5. values in ``ignore_index`` are ignored; values in ``[0, num_classes)`` are counted for their
   class; any other value is *unknown*: counted apart and reported, or an error with
   ``strict=True``.

Steps 3-5 act on the histogram (a few distinct values per image), never on every pixel.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from segreward.data.io import read_image, read_label, rgb_to_label
from segreward.data.meta import build_lut, get_meta
from segreward.errors import SegrewardError

# Values that read_label may give for a colour that is not in the palette.
UNLISTED_COLOUR = -1
# How many files with unknown values / skipped files are listed by name in the results.
MAX_LISTED_FILES = 100


@dataclass(frozen=True)
class LabelSpec:
    """How raw label values become class ids (hashable, sent to the worker processes)."""

    num_classes: int | None = None
    ignore_index: tuple[int, ...] = (255,)
    reduce_zero_label: bool = False
    label_map: tuple[tuple[int, int], ...] | None = None
    map_unlisted: bool = False
    palette: tuple[tuple[tuple[int, int, int], int], ...] | None = None
    strict: bool = False
    skip_bad: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": list(self.ignore_index),
            "reduce_zero_label": self.reduce_zero_label,
            "label_map": None if self.label_map is None else {str(k): v for k, v in self.label_map},
            "map_unlisted": self.map_unlisted,
            "palette": None if self.palette is None else [[list(c), i] for c, i in self.palette],
            "strict": self.strict,
            "skip_bad": self.skip_bad,
        }


# --------------------------------------------------------------------------- per image



_ALL_BYTES = np.arange(256, dtype=np.int64)


def _histogram(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, counts)`` of ``label``; for ``uint8`` maps all 256 values (zeros included)."""
    flat = np.ascontiguousarray(label).reshape(-1)
    n = flat.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Run ends: positions i where flat[i] != flat[i + 1], and the last pixel.
    end = np.empty(n, dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=end[:-1])
    end[-1] = True
    ends = np.flatnonzero(end)
    if ends.size > n // 4:
        # Noisy map (short runs): the plain histogram is faster.
        if flat.dtype == np.uint8:
            return _ALL_BYTES, np.bincount(flat, minlength=256)
        values, counts = np.unique(flat, return_counts=True)
        return values.astype(np.int64), counts.astype(np.int64)
    lengths = np.diff(ends, prepend=-1)
    run_values = flat[ends]
    if flat.dtype == np.uint8:
        return _ALL_BYTES, np.bincount(run_values, weights=lengths, minlength=256).astype(np.int64)
    values, inverse = np.unique(run_values, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=lengths, minlength=values.size)
    return values.astype(np.int64), counts.astype(np.int64)


def value_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``label`` and their pixel counts (both ``int64``, values sorted).

    Counts run ends instead of every pixel: ``np.bincount`` over a label map is slow because
    long runs of one value hit the same bin again and again (each increment waits for the
    previous one), while finding where the value changes is a vectorised comparison.
    """
    values, counts = _histogram(label)
    keep = counts > 0
    return values[keep], counts[keep]


@lru_cache(maxsize=8)
def _destination(spec: LabelSpec) -> np.ndarray:
    """For every 16-bit raw value: its class id, ``num_classes`` if ignored, ``num_classes + 1``
    if unknown: the whole per-value pipeline as one table lookup."""
    assert spec.num_classes is not None
    raw = np.arange(65536, dtype=np.int64)
    ids = map_values(raw, spec)
    dest = np.where((ids >= 0) & (ids < spec.num_classes), ids, spec.num_classes + 1)
    dest[np.isin(ids, spec.ignore_index)] = spec.num_classes
    return dest


@lru_cache(maxsize=8)
def _lut(spec: LabelSpec) -> np.ndarray | None:
    if spec.label_map is None:
        return None
    return build_lut(dict(spec.label_map), spec.ignore_index[0], spec.map_unlisted)


def map_values(values: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Raw label values -> class ids (steps 3 and 4 of the module doc); ignored values become
    ``spec.ignore_index[0]``."""
    values = np.asarray(values, dtype=np.int64)
    ignore = spec.ignore_index[0]
    if spec.reduce_zero_label:
        values = np.where((values == 0) | np.isin(values, spec.ignore_index), ignore, values - 1)
    lut = _lut(spec)
    if lut is not None:
        inside = (values >= 0) & (values < lut.size)
        outside = ignore if spec.map_unlisted else values
        values = np.where(inside, lut[np.clip(values, 0, lut.size - 1)], outside)
    return values


def _read(path: Path, spec: LabelSpec) -> np.ndarray:
    if spec.palette is not None:
        try:
            with Image.open(path) as img:  # header only: is it a colour-coded map?
                mode = img.mode
        except Exception:  # noqa: BLE001 - read_label below gives the clear message
            mode = None
        if mode in ("RGB", "RGBA"):
            return rgb_to_label(read_image(path), dict(spec.palette), unknown=UNLISTED_COLOUR, path=path)
    return read_label(path)


def _unknown_message(path: Path, unknown: dict[int, int], spec: LabelSpec) -> str:
    shown = ", ".join(f"{v} ({c} px)" for v, c in sorted(unknown.items())[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    hint = ""
    if UNLISTED_COLOUR in unknown and spec.palette is not None:
        hint = f"; {UNLISTED_COLOUR} means a colour that is not in the palette"
    if spec.reduce_zero_label or spec.label_map:
        shown += " (after the label map / reduce-zero-label)"
    return (f"{path}: label values {shown}{more} are not classes (num_classes={spec.num_classes}) and not "
            f"ignored ({_ignore_text(spec.ignore_index)}){hint}; check --num-classes, "
            "--ignore-index, --label-map / --reduce-zero-label, or leave out --strict to count them as 'unknown'")


# --------------------------------------------------------------------------- tallies


@dataclass
class _Tally:
    """Sums over some images; merged across worker chunks."""

    size: int  # length of the per-class arrays (grows when num_classes is inferred)
    counts: np.ndarray = None  # type: ignore[assignment]
    images: np.ndarray = None  # type: ignore[assignment]
    image_pixels: np.ndarray = None  # type: ignore[assignment]
    num_images: int = 0
    seen: int = 0
    ignored: int = 0
    unknown: dict[int, int] = field(default_factory=dict)
    unknown_files: list[tuple[str, dict[int, int]]] = field(default_factory=list)
    num_unknown_files: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.size, np.int64)
            self.images = np.zeros(self.size, np.int64)
            self.image_pixels = np.zeros(self.size, np.int64)

    def grow(self, size: int) -> None:
        if size > self.size:
            pad = size - self.size
            self.counts = np.pad(self.counts, (0, pad))
            self.images = np.pad(self.images, (0, pad))
            self.image_pixels = np.pad(self.image_pixels, (0, pad))
            self.size = size

    def add_image(self, per_class: np.ndarray) -> None:
        if per_class.size > self.size:
            self.grow(per_class.size)
        elif per_class.size < self.size:
            per_class = np.pad(per_class, (0, self.size - per_class.size))
        present = per_class > 0
        self.counts += per_class
        self.images += present
        self.image_pixels += present * int(per_class.sum())
        self.num_images += 1

    def add_images(self, per_class: np.ndarray, ignored: int) -> None:
        """Several images at once: ``per_class`` is ``[images, classes]``."""
        present = per_class > 0
        self.counts += per_class.sum(axis=0)
        self.images += present.sum(axis=0)
        self.image_pixels += (present * per_class.sum(axis=1, keepdims=True)).sum(axis=0)
        self.num_images += per_class.shape[0]
        self.ignored += ignored

    def merge(self, other: "_Tally") -> None:
        self.grow(other.size)
        for name in ("counts", "images", "image_pixels"):
            getattr(self, name)[: other.size] += getattr(other, name)
        self.num_images += other.num_images
        self.seen += other.seen
        self.ignored += other.ignored
        for v, c in other.unknown.items():
            self.unknown[v] = self.unknown.get(v, 0) + c
        self.unknown_files += other.unknown_files[: max(0, MAX_LISTED_FILES - len(self.unknown_files))]
        self.num_unknown_files += other.num_unknown_files
        self.bad += other.bad


def count_chunk(paths: Sequence[str | Path], spec: LabelSpec) -> _Tally:
    """Count the images in ``paths`` (run in a worker process). Stops at the first bad file
    unless ``spec.skip_bad``; bad files are returned in ``tally.bad``, never raised."""
    size = spec.num_classes or 0
    tally = _Tally(size)
    table = _destination(spec) if spec.num_classes is not None else None
    rows: list[np.ndarray] = []  # per image: pixels per class, then ignored, then unknown (= 0)
    for path in map(Path, paths):
        tally.seen += 1
        try:
            label = _read(path, spec)
        except SegrewardError as e:
            tally.bad.append((str(path), str(e)))
            if not spec.skip_bad:
                break
            continue
        values, counts = _histogram(label)
        if table is not None and (values is _ALL_BYTES or (values.size and 0 <= values[0] and values[-1] < 65536)):
            # Fast path: one table lookup and one small bincount per image.
            per = np.bincount(table[values], weights=counts, minlength=size + 2)
            if per[size + 1] == 0:
                rows.append(per)  # summed once per chunk below
                continue
        keep = counts > 0
        values, counts = values[keep], counts[keep]
        ids = map_values(values, spec) if (spec.reduce_zero_label or spec.label_map) else values
        ignored = np.isin(ids, spec.ignore_index)
        limit = spec.num_classes if spec.num_classes is not None else np.iinfo(np.int64).max
        valid = ~ignored & (ids >= 0) & (ids < limit)
        unknown_mask = ~ignored & ~valid
        if unknown_mask.any():
            unknown: dict[int, int] = {}
            for v, c in zip(ids[unknown_mask].tolist(), counts[unknown_mask].tolist()):
                unknown[v] = unknown.get(v, 0) + c
            if spec.strict:
                tally.bad.append((str(path), _unknown_message(path, unknown, spec)))
                if not spec.skip_bad:
                    break
                continue
            for v, c in unknown.items():
                tally.unknown[v] = tally.unknown.get(v, 0) + c
            tally.num_unknown_files += 1
            if len(tally.unknown_files) < MAX_LISTED_FILES:
                tally.unknown_files.append((str(path), unknown))
        tally.ignored += int(counts[ignored].sum())
        ids, counts = ids[valid], counts[valid]
        per_class = np.bincount(ids, weights=counts, minlength=size) if ids.size else np.zeros(size)
        tally.add_image(per_class.astype(np.int64))
    if rows:
        per_image = np.array(rows, dtype=np.int64)  # exact: float64 sums of pixel counts < 2**53
        tally.add_images(per_image[:, :size], int(per_image[:, size].sum()))
    return tally


# --------------------------------------------------------------------------- results


@dataclass
class ClassFrequencies:
    """Pixels per class over a set of label maps.

    ``counts[c]``: pixels of class c; ``total_pixels``: pixels counted for some class (ignored
    and unknown pixels excluded); ``images_with_class[c]``: images where class c occurs;
    ``pixels_in_images_with_class[c]``: counted pixels of those images (for median-frequency
    weights); ``unknown_values``: value -> pixels for values that are neither a class nor
    ignored (``-1`` = a colour missing from the palette).
    """

    counts: np.ndarray
    images_with_class: np.ndarray
    pixels_in_images_with_class: np.ndarray
    num_images: int
    class_names: list[str]
    ignored_pixels: int = 0
    unknown_values: dict[int, int] = field(default_factory=dict)
    files_with_unknown: list[tuple[str, dict[int, int]]] = field(default_factory=list)
    num_files_with_unknown: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    num_skipped: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.counts.size)

    @property
    def total_pixels(self) -> int:
        return int(self.counts.sum())

    @property
    def unknown_pixels(self) -> int:
        return int(sum(self.unknown_values.values()))

    @property
    def frequencies(self) -> np.ndarray:
        total = self.total_pixels
        return self.counts / total if total else np.zeros(self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "counts": self.counts.tolist(),
            "frequencies": self.frequencies.tolist(),
            "images_with_class": self.images_with_class.tolist(),
            "pixels_in_images_with_class": self.pixels_in_images_with_class.tolist(),
            "total_pixels": self.total_pixels,
            "num_images": self.num_images,
            "ignored_pixels": self.ignored_pixels,
            "unknown_pixels": self.unknown_pixels,
            "unknown_values": {str(k): v for k, v in sorted(self.unknown_values.items())},
            "num_files_with_unknown": self.num_files_with_unknown,
            "files_with_unknown": [{"file": f, "values": {str(k): v for k, v in sorted(u.items())}}
                                   for f, u in self.files_with_unknown],
            "num_skipped": self.num_skipped,
            "skipped": [{"file": f, "error": e} for f, e in self.skipped],
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "ClassFrequencies":
        if not isinstance(data, Mapping) or "counts" not in data:
            raise SegrewardError(f"{source}: expected a JSON object with a 'counts' list (pixels per class), "
                                 "as written by `segreward stats freq`")
        counts = _int_list(data["counts"], "counts", source)
        n = len(counts)
        if n == 0:
            raise SegrewardError(f"{source}: 'counts' is empty; expected one pixel count per class")
        declared = data.get("num_classes")
        if declared is not None and (isinstance(declared, bool) or declared != n):
            raise SegrewardError(f"{source}: num_classes is {declared!r} but 'counts' has {n} entries; "
                                 "the file is inconsistent, count again with `segreward stats freq`")
        images = _int_list(data.get("images_with_class", [0] * n), "images_with_class", source, n)
        pix = _int_list(data.get("pixels_in_images_with_class", [0] * n), "pixels_in_images_with_class", source, n)
        names = data.get("class_names") or [str(i) for i in range(n)]
        if len(names) != n:
            raise SegrewardError(f"{source}: {len(names)} class_names for {n} counts; give one name per class")
        return cls(
            counts=np.asarray(counts, np.int64), images_with_class=np.asarray(images, np.int64),
            pixels_in_images_with_class=np.asarray(pix, np.int64), num_images=int(data.get("num_images", 0)),
            class_names=[str(s) for s in names], ignored_pixels=int(data.get("ignored_pixels", 0)),
            unknown_values={int(k): int(v) for k, v in (data.get("unknown_values") or {}).items()},
            num_files_with_unknown=int(data.get("num_files_with_unknown", 0)),
            num_skipped=int(data.get("num_skipped", 0)), options=dict(data.get("options") or {}),
        )


def _ignore_text(ignore) -> str:
    """The ignore index for a message; the internal "nothing ignored" value is never shown."""
    shown = [str(i) for i in ignore if i != -(2**62)]
    return f"ignore index {', '.join(shown)}" if shown else "no ignore index"


def _int_list(value: Any, key: str, source: str, n: int | None = None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v >= 0 and v == int(v) for v in value):
        raise SegrewardError(f"{source}: '{key}' must be a list of non-negative whole numbers, got {str(value)[:80]}")
    if n is not None and len(value) != n:
        raise SegrewardError(f"{source}: '{key}' has {len(value)} entries, expected {n} (one per class)")
    return [int(v) for v in value]


# --------------------------------------------------------------------------- files


def find_label_files(root: str | Path, suffix: str = ".png", recursive: bool = True,
                     exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Label files under ``root`` whose names end with ``suffix`` (sorted), but those in
    ``exclude``; ``root`` may be a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SegrewardError(f"{root}: folder not found; give the folder that holds the label maps")
    pattern = f"*{suffix}"
    found = root.rglob(pattern) if recursive else root.glob(pattern)
    skip = {Path(p).resolve() for p in exclude}
    files = sorted(p for p in found if p.is_file() and p.resolve() not in skip)
    if not files:
        how = "recursively" if recursive else "not recursively"
        raise SegrewardError(f"{root}: no files ending in {suffix!r} (searched {how}); check the folder "
                             "and --suffix (e.g. --suffix _labelTrainIds.png)")
    return files


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _chunks(items: Sequence[Path], workers: int) -> list[list[str]]:
    size = max(1, min(64, math.ceil(len(items) / (workers * 8))))
    return [[str(p) for p in items[i : i + size]] for i in range(0, len(items), size)]


def _as_tuple(ignore_index: int | Iterable[int] | None) -> tuple[int, ...]:
    if ignore_index is None:
        return ()
    if isinstance(ignore_index, (int, np.integer)):
        return (int(ignore_index),)
    return tuple(int(i) for i in ignore_index)


def make_spec(
    *,
    num_classes: int | None = None,
    ignore_index: int | Iterable[int] | None = None,
    reduce_zero_label: bool | None = None,
    label_map: Mapping[int, int] | None = None,
    map_unlisted: bool | None = None,
    palette: Mapping[tuple[int, int, int], int] | Sequence[Sequence[int]] | None = None,
    dataset: str | None = None,
    strict: bool = False,
    skip_bad: bool = False,
) -> LabelSpec:
    """A :class:`LabelSpec`; ``dataset`` (a :func:`~segreward.data.meta.get_meta` name) gives the
    defaults for every argument left as ``None``."""
    meta = get_meta(dataset) if dataset else None
    if num_classes is None and meta is not None:
        num_classes = meta.num_classes
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or num_classes < 1):
        raise SegrewardError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ignore_index is None:
        ignore = (meta.ignore_index,) if meta is not None else (255,)
    else:
        ignore = _as_tuple(ignore_index)
    if not ignore:
        ignore = (-(2**62),)  # nothing is ignored; a value no label holds
    if reduce_zero_label is None:
        reduce_zero_label = bool(meta.reduce_zero_label) if meta is not None else False
    if label_map is None and meta is not None and meta.label_map is not None:
        label_map = meta.label_map
        if map_unlisted is None:
            map_unlisted = meta.map_unlisted
    lm = None
    if label_map is not None:
        lm = tuple(sorted((int(k), int(v)) for k, v in label_map.items()))
        bad = [k for k, _ in lm if not 0 <= k < 65536]
        if bad:
            raise SegrewardError(f"label map keys must be raw label values in [0, 65535], got {bad[:5]}")
    pal = None
    if palette is not None:
        items = palette.items() if isinstance(palette, Mapping) else ((c, i) for i, c in enumerate(palette))
        pal = tuple((tuple(int(v) for v in colour), int(i)) for colour, i in items)
        if not pal or any(len(c) != 3 for c, _ in pal):
            raise SegrewardError("a palette maps (R, G, B) colours to class ids; got an empty or malformed one")
    return LabelSpec(num_classes=None if num_classes is None else int(num_classes), ignore_index=ignore,
                     reduce_zero_label=bool(reduce_zero_label), label_map=lm, map_unlisted=bool(map_unlisted),
                     palette=pal, strict=bool(strict), skip_bad=bool(skip_bad))


def class_frequencies(
    root: str | Path | Sequence[str | Path],
    *,
    suffix: str = ".png",
    recursive: bool = True,
    spec: LabelSpec | None = None,
    class_names: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool | None = True,
    exclude: Iterable[str | Path] = (),
    **spec_kwargs: Any,
) -> ClassFrequencies:
    """Count pixels per class in every label file under ``root`` (or in a list of files).

    The label handling is given by ``spec`` or by keyword arguments of :func:`make_spec`
    (``num_classes``, ``ignore_index``, ``reduce_zero_label``, ``label_map``, ``map_unlisted``,
    ``palette``, ``dataset``, ``strict``, ``skip_bad``). ``workers`` processes count in
    parallel (default: every core; 1 counts in this process). ``progress=None`` shows the bar
    only on a terminal. ``exclude``: files under ``root`` that are not label maps (e.g. this
    command's own outputs, such as a frequencies.png written into ``root``). Without ``num_classes`` (and
    no dataset), the number of classes is the largest counted value + 1.

    Bad files (unreadable, or with values out of range under ``strict``) stop the run with a
    :class:`SegrewardError` naming the file, or with ``skip_bad`` are skipped and listed in
    ``result.skipped``.
    """
    dataset = spec_kwargs.get("dataset")
    if class_names is None and dataset:
        class_names = get_meta(dataset).classes
    if spec is None:
        spec = make_spec(**spec_kwargs)
    elif spec_kwargs:
        raise TypeError(f"give either spec or keyword options, not both: {sorted(spec_kwargs)}")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if spec.num_classes is None:
            spec = replace(spec, num_classes=len(class_names))
        _class_names(class_names, spec.num_classes)  # fail before counting, not after
    if isinstance(root, (str, Path)):
        files = find_label_files(root, suffix, recursive, exclude)
        where = str(root)
    else:
        files = [Path(p) for p in root]
        where = f"{len(files)} files"
        if not files:
            raise SegrewardError("no label files given")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise SegrewardError(f"workers must be >= 1, got {workers}")
    workers = min(workers, len(files))

    total = _Tally(spec.num_classes or 0)
    bar = tqdm(total=len(files), unit="img", desc="counting", disable=None if progress is None else not progress,
               leave=False)

    def take(part: _Tally) -> None:
        total.merge(part)
        bar.update(part.seen)
        if part.bad and not spec.skip_bad:
            raise SegrewardError(f"{part.bad[0][1]} (--skip-bad skips such files and goes on)")

    try:
        if workers == 1:
            for chunk in _chunks(files, 1):
                take(count_chunk(chunk, spec))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(count_chunk, chunk, spec) for chunk in _chunks(files, workers)}
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            take(fut.result())
                finally:
                    for fut in pending:
                        fut.cancel()
    finally:
        bar.close()

    if total.num_images == 0:
        raise SegrewardError(f"{where}: all {len(files)} label files were skipped as unreadable or invalid; "
                             f"first: {total.bad[0][0]}: {total.bad[0][1]}")
    num_classes = spec.num_classes if spec.num_classes is not None else total.size
    if num_classes == 0:
        raise SegrewardError(f"{where}: every pixel is ignored (ignore index {list(spec.ignore_index)}); "
                             "nothing to count")
    total.grow(num_classes)
    names = _class_names(class_names, num_classes)
    options = {"dataset": dataset, "root": where, "suffix": suffix, "recursive": recursive,
               "num_images_found": len(files),
               "num_classes_inferred": spec.num_classes is None, **spec.describe()}
    options["num_classes"] = num_classes
    bad = sorted(total.bad)
    return ClassFrequencies(
        counts=total.counts, images_with_class=total.images, pixels_in_images_with_class=total.image_pixels,
        num_images=total.num_images, class_names=names, ignored_pixels=total.ignored,
        unknown_values=dict(sorted(total.unknown.items())), files_with_unknown=sorted(total.unknown_files),
        num_files_with_unknown=total.num_unknown_files, skipped=bad[:MAX_LISTED_FILES], num_skipped=len(bad),
        options=options,
    )


def _class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise SegrewardError(f"{len(names)} class names for {num_classes} classes; give one name per class "
                             "(or set --num-classes to match)")
    return names


def load_frequencies(path: str | Path) -> ClassFrequencies:
    """Read ``frequencies.json`` (or a folder holding it) written by :meth:`ClassFrequencies.to_dict`;
    a JSON object with just a ``counts`` list works too."""
    path = Path(path)
    if path.is_dir():
        path = path / "frequencies.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SegrewardError(f"{path}: file not found; run `segreward stats freq` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegrewardError(f"{path}: not a readable JSON file ({e})") from None
    return ClassFrequencies.from_dict(data, str(path))
