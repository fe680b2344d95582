"""Pixel counting (segreward.stats.counting) against numpy references written here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segreward.errors import SegrewardError
from segreward.stats import class_frequencies, find_label_files, load_frequencies, save_frequencies, value_counts

C = 7  # classes 0..6; 3 and 6 never occur in the fixtures
PRESENT = np.array([0, 1, 2, 4, 5])
IGNORE = 255


def _label(rng: np.random.Generator, h: int = 30, w: int = 120) -> np.ndarray:
    """A piecewise-constant map (blocks, like real label maps) with a few noisy pixels and
    ignore pixels (a block and scattered ones)."""
    a = np.zeros((h, w), np.int64)
    for _ in range(4):
        y, x = rng.integers(0, h), rng.integers(0, w)
        a[y:, x:] = rng.choice(PRESENT)
    noise = rng.random((h, w)) < 0.005
    a[noise] = rng.choice(PRESENT, noise.sum())
    a[rng.random((h, w)) < 0.003] = IGNORE
    y, x = rng.integers(0, h - 3), rng.integers(0, w - 5)
    a[y : y + 3, x : x + 5] = IGNORE
    return a


def _reference(labels: list[np.ndarray], num_classes: int, ignore=(IGNORE,)) -> dict:
    """Per class: pixels, images where it occurs, pixels of those images; plus ignored/unknown."""
    counts = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    ignored = unknown = 0
    for a in labels:
        per = np.array([int((a == c).sum()) for c in range(num_classes)])
        counts += per
        images += per > 0
        image_pixels += (per > 0) * per.sum()
        is_ignored = np.isin(a, ignore)
        ignored += int(is_ignored.sum())
        unknown += int((~is_ignored & ((a < 0) | (a >= num_classes))).sum())
    return {"counts": counts, "images": images, "image_pixels": image_pixels, "ignored": ignored, "unknown": unknown}


def _check(freq, ref) -> None:
    np.testing.assert_array_equal(freq.counts, ref["counts"])
    np.testing.assert_array_equal(freq.images_with_class, ref["images"])
    np.testing.assert_array_equal(freq.pixels_in_images_with_class, ref["image_pixels"])
    assert freq.ignored_pixels == ref["ignored"]
    assert freq.unknown_pixels == ref["unknown"]
    assert freq.total_pixels == ref["counts"].sum()
    np.testing.assert_allclose(freq.frequencies, ref["counts"] / ref["counts"].sum())


def _labels(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_label(rng, 30 + i, 120 + 3 * i) for i in range(n)]


# ----------------------------------------------------------------------------- value_counts


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (33, 47), (64, 129)])
@pytest.mark.parametrize("kind", ["blocks", "long_runs", "noise", "constant"])
def test_value_counts_matches_np_unique(dtype, shape, kind):
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    if kind == "noise":
        a = rng.integers(0, 200, shape)
    elif kind == "long_runs":  # few changes: the run-length path
        a = np.zeros(shape, np.int64)
        a[shape[0] // 3 :, : shape[1] // 2] = 3
        a[shape[0] // 2 :, shape[1] // 3 :] = 150
        a[-1, -1] = 199
    elif kind == "constant":
        a = np.full(shape, 7)
    else:
        a = np.repeat(rng.integers(0, 200, (shape[0], max(1, shape[1] // 9))), 9, axis=1)[:, : shape[1]]
        a = np.pad(a, ((0, 0), (0, shape[1] - a.shape[1])), mode="edge")
    a = a.astype(dtype)
    values, counts = value_counts(a)
    ref_values, ref_counts = np.unique(a, return_counts=True)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(counts, ref_counts)


def test_value_counts_non_contiguous_view():
    a = np.arange(600, dtype=np.uint8).reshape(20, 30) // 7
    view = a[::2, 1::3]
    values, counts = value_counts(view)
    ref_values, ref_counts = np.unique(view, return_counts=True)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(counts, ref_counts)


# ----------------------------------------------------------------------------- encodings


def _save_l(a, path):
    Image.fromarray(a.astype(np.uint8), "L").save(path)


def _save_p(a, path):
    img = Image.fromarray(a.astype(np.uint8), "P")
    # A palette whose colours differ from the indices: counts must use the indices.
    img.putpalette([(i * 37) % 256 for i in range(256)] * 3)
    img.save(path)


def _save_16(a, path):
    Image.fromarray(a.astype(np.uint16)).save(path)


@pytest.mark.parametrize("save", [_save_l, _save_p, _save_16], ids=["L", "P", "16bit"])
def test_counts_match_reference_per_encoding(tmp_path, save):
    labels = _labels()
    for i, a in enumerate(labels):
        save(a, tmp_path / f"img{i:02d}.png")
    freq = class_frequencies(tmp_path, num_classes=C, workers=1, progress=False)
    _check(freq, _reference(labels, C))
    assert freq.num_images == len(labels)
    assert freq.counts[3] == 0 and freq.counts[6] == 0  # absent everywhere
    with Image.open(tmp_path / "img00.png") as img:
        assert img.mode == {"_save_l": "L", "_save_p": "P", "_save_16": "I;16"}[save.__name__]


def test_16bit_large_values_and_multiple_ignore_indices(tmp_path):
    rng = np.random.default_rng(3)
    labels = []
    for i in range(3):
        a = _label(rng, 30, 40)
        a[:2, :5] = 65535  # a second ignore value, only representable in 16 bit
        a[5, :3] = 1000  # not a class, not ignored -> unknown
        labels.append(a)
        _save_16(a, tmp_path / f"x{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, ignore_index=[255, 65535], workers=1, progress=False)
    _check(freq, _reference(labels, C, ignore=(255, 65535)))
    assert freq.unknown_values == {1000: 9}
    assert freq.num_files_with_unknown == 3


def test_rgb_with_palette(tmp_path):
    palette = {(10, 20, 30): 0, (200, 0, 0): 1, (0, 200, 0): 2, (0, 0, 200): 4, (50, 50, 50): 5,
               (255, 255, 255): 255}
    colour_of = {v: c for c, v in palette.items()}
    labels = _labels(4, seed=1)
    for i, a in enumerate(labels):
        rgb = np.zeros(a.shape + (3,), np.uint8)
        for value, colour in colour_of.items():
            rgb[a == value] = colour
        rgb[0, 0] = (1, 2, 3)  # a colour missing from the palette
        Image.fromarray(rgb, "RGB").save(tmp_path / f"c{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, palette=palette, workers=1, progress=False)
    expected = [a.copy() for a in labels]
    for a in expected:
        a[0, 0] = -1
    _check(freq, _reference(expected, C))
    assert freq.unknown_values == {-1: 4}
    # strict: the message names the file and says what -1 means
    with pytest.raises(SegrewardError, match=r"c0\.png.*-1.*not in the palette"):
        class_frequencies(tmp_path, num_classes=C, palette=palette, strict=True, workers=1, progress=False)


def test_rgb_without_palette_is_rejected(tmp_path):
    Image.fromarray(np.zeros((4, 5, 3), np.uint8), "RGB").save(tmp_path / "rgb.png")
    with pytest.raises(SegrewardError, match=r"rgb\.png.*3 channels.*palette"):
        class_frequencies(tmp_path, num_classes=3, workers=1, progress=False)


def test_reduce_zero_label_like_mmseg(tmp_path):
    labels = _labels(3, seed=2)
    raw = [(a + 1) % 256 for a in labels]  # shift up; 255 -> 0 ("other" in ADE20K)
    raw[0][0, :4] = 255  # raw ignore value stays ignored
    for i, a in enumerate(raw):
        _save_l(a, tmp_path / f"r{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, reduce_zero_label=True, workers=1, progress=False)
    # Reference: mmseg LoadAnnotations in uint8 arithmetic.
    expected = []
    for a in raw:
        b = a.astype(np.uint8).copy()
        b[b == 0] = 255
        b = b - 1
        b[b == 254] = 255
        expected.append(b.astype(np.int64))
    _check(freq, _reference(expected, C))


def test_label_map_cityscapes_labelids(tmp_path):
    id_to_train = {7: 0, 8: 1, 11: 2, 26: 13}
    rng = np.random.default_rng(5)
    raw = [rng.choice([0, 1, 7, 8, 11, 26, 33], size=(12, 17)) for _ in range(3)]
    for i, a in enumerate(raw):
        _save_l(a, tmp_path / f"{i}_gtFine_labelIds.png")
    (tmp_path / "ignored_color.png").write_bytes(b"not even a png")  # wrong suffix: never read
    freq = class_frequencies(tmp_path, suffix="_labelIds.png", dataset="cityscapes_labelids", workers=1,
                             progress=False)
    # Reference: the official mapping for these ids; every other id is ignored.
    full = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    mapped = [np.vectorize(lambda v: full.get(int(v), 255))(a) for a in raw]
    _check(freq, _reference(mapped, 19))
    assert freq.class_names[13] == "car"
    assert freq.num_classes == 19
    # A user label map: unlisted values kept (then unknown), or ignored with map_unlisted.
    kept = class_frequencies(tmp_path, suffix="_labelIds.png", num_classes=19, label_map=id_to_train,
                             workers=1, progress=False)
    ref = [np.vectorize(lambda v: id_to_train.get(int(v), int(v)))(a) for a in raw]
    _check(kept, _reference(ref, 19))
    dropped = class_frequencies(tmp_path, suffix="_labelIds.png", num_classes=19, label_map=id_to_train,
                                map_unlisted=True, workers=1, progress=False)
    ref = [np.vectorize(lambda v: id_to_train.get(int(v), 255))(a) for a in raw]
    _check(dropped, _reference(ref, 19))


def test_two_workers_equal_reference(tmp_path):
    labels = _labels(10, seed=7)
    for i, a in enumerate(labels):
        sub = tmp_path / "a" if i % 2 else tmp_path / "b" / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        _save_l(a, sub / f"{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, workers=2, progress=False)
    _check(freq, _reference(labels, C))
    # not recursive: nothing at the top level
    with pytest.raises(SegrewardError, match="no files ending in '.png'"):
        class_frequencies(tmp_path, num_classes=C, recursive=False, progress=False)


def test_num_classes_inferred_and_class_names(tmp_path):
    labels = _labels(3)
    for i, a in enumerate(labels):
        _save_l(a, tmp_path / f"{i}.png")
    freq = class_frequencies(tmp_path, workers=1, progress=False)
    assert freq.num_classes == 6  # largest value that occurs is 5
    _check(freq, _reference(labels, 6))
    names = [f"c{i}" for i in range(C)]
    freq = class_frequencies(tmp_path, class_names=names, workers=1, progress=False)
    assert freq.num_classes == C and freq.class_names == names
    with pytest.raises(SegrewardError, match="3 class names for 7 classes"):
        class_frequencies(tmp_path, class_names=["a", "b", "c"], num_classes=C, workers=1, progress=False)


def test_json_round_trip_and_csv(tmp_path):
    labels = _labels(3)
    for i, a in enumerate(labels):
        _save_l(a, tmp_path / f"{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, workers=1, progress=False)
    out = tmp_path / "out"
    paths = save_frequencies(freq, out, plot=True)
    assert [p.name for p in paths] == ["frequencies.json", "frequencies.csv", "frequencies.png"]
    back = load_frequencies(out)  # the folder works too
    np.testing.assert_array_equal(back.counts, freq.counts)
    np.testing.assert_array_equal(back.pixels_in_images_with_class, freq.pixels_in_images_with_class)
    data = freq.to_dict()
    for key in ("counts", "frequencies", "images_with_class", "total_pixels", "class_names", "options"):
        assert key in data
    assert data["options"]["ignore_index"] == [255]
    import csv

    rows = list(csv.DictReader((out / "frequencies.csv").open()))
    assert [int(r["pixels"]) for r in rows] == freq.counts.tolist()


# ----------------------------------------------------------------------------- bad input


def test_corrupt_png_stops_or_is_skipped(tmp_path):
    labels = _labels(4)
    for i, a in enumerate(labels):
        _save_l(a, tmp_path / f"{i}.png")
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "9_truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(SegrewardError, match=r"9_truncated\.png.*corrupt or truncated.*--skip-bad"):
        class_frequencies(tmp_path, num_classes=C, workers=1, progress=False)
    freq = class_frequencies(tmp_path, num_classes=C, skip_bad=True, workers=2, progress=False)
    _check(freq, _reference(labels, C))
    assert freq.num_skipped == 1 and freq.skipped[0][0].endswith("9_truncated.png")


def test_out_of_range_strict_and_not(tmp_path):
    labels = _labels(3)
    labels[1][2, :3] = 9
    labels[2][0, 0] = 42
    for i, a in enumerate(labels):
        _save_l(a, tmp_path / f"{i}.png")
    freq = class_frequencies(tmp_path, num_classes=C, workers=1, progress=False)
    _check(freq, _reference(labels, C))
    assert freq.unknown_values == {9: 3, 42: 1}
    assert freq.num_files_with_unknown == 2
    assert [f for f, _ in freq.files_with_unknown] == [str(tmp_path / "1.png"), str(tmp_path / "2.png")]
    with pytest.raises(SegrewardError, match=r"1\.png: label values 9 \(3 px\).*num_classes=7"):
        class_frequencies(tmp_path, num_classes=C, strict=True, workers=1, progress=False)
    skipped = class_frequencies(tmp_path, num_classes=C, strict=True, skip_bad=True, workers=1, progress=False)
    assert skipped.num_skipped == 2 and skipped.num_images == 1
    _check(skipped, _reference(labels[:1], C))


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(SegrewardError, match=rf"{tmp_path}: no files ending in '_labelTrainIds.png'"):
        find_label_files(tmp_path, "_labelTrainIds.png")
    with pytest.raises(SegrewardError, match="folder not found"):
        class_frequencies(tmp_path / "nope", num_classes=3, progress=False)


def test_all_files_bad(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(SegrewardError, match=r"all 1 label files were skipped.*a\.png"):
        class_frequencies(tmp_path, num_classes=3, skip_bad=True, workers=1, progress=False)
