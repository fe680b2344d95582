import json

import numpy as np
import pytest
import torch

from segreward.data import synthetic as S
from segreward.data.io import read_image, read_label
from segreward.data.meta import get_meta
from segreward.errors import SegrewardError

SIZE = (48, 96)


@pytest.fixture(scope="module")
def day():
    return S.generate(60, "day", seed=3, size=SIZE)


def test_deterministic_from_seed(day):
    images, labels = S.generate(60, "day", seed=3, size=SIZE)
    np.testing.assert_array_equal(images, day[0])
    np.testing.assert_array_equal(labels, day[1])
    other_images, other_labels = S.generate(60, "day", seed=4, size=SIZE)
    assert (other_labels != labels).mean() > 0.1
    # image i depends on (seed, split, i) only: a later chunk equals the tail of a longer run
    tail_images, tail_labels = S.generate(10, "day", seed=3, size=SIZE, start=50)
    np.testing.assert_array_equal(tail_images, images[50:])
    np.testing.assert_array_equal(tail_labels, labels[50:])
    # splits are different streams
    _, val_labels = S.generate(10, "day", seed=3, size=SIZE, split="val")
    assert (val_labels != labels[:10]).mean() > 0.1


def test_shapes_and_label_range(day):
    images, labels = day
    assert images.shape == (60, *SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (60, *SIZE) and labels.dtype == np.uint8
    assert labels.max() < len(S.CLASSES)


def test_class_frequencies_imbalanced_and_present(day):
    _, labels = day
    counts = np.zeros(len(S.CLASSES))
    for c in range(len(S.CLASSES)):
        counts[c] = (labels == c).sum()
    freq = counts / labels.size
    np.testing.assert_allclose(S.class_frequencies(labels), freq)
    name = dict(zip(S.CLASSES, freq))
    assert all(f > 0.001 for f in freq), name
    # large stuff classes vs thin/small thing classes
    for big in ("road", "building"):
        assert name[big] > 0.2, name
    for small in ("pole", "person"):
        assert name[small] < 0.02, name
    # every image has road, sky-or-building, and most have a pole
    present = np.stack([(labels == c).any(axis=(1, 2)) for c in range(len(S.CLASSES))], 1)
    assert present[:, S.ROAD].all() and present[:, S.BUILDING].all()
    assert present[:, S.POLE].mean() > 0.8


def test_image_agrees_with_label(day):
    images, labels = day
    img = images.astype(np.float64)
    sky = img[labels == S.SKY].mean(0)
    veg = img[labels == S.VEGETATION].mean(0)
    road = img[labels == S.ROAD].mean(0)
    assert sky[2] > sky[0] + 20          # daylight sky is blue
    assert veg[1] > veg[0] and veg[1] > veg[2]  # vegetation is green
    assert abs(road[0] - road[2]) < 25 and road.mean() < sky.mean()  # asphalt is grey and darker


def test_style_changes_appearance_not_layout(day):
    images, labels = day
    dusk_images, dusk_labels = S.generate(60, "dusk", seed=3, size=SIZE)
    np.testing.assert_array_equal(dusk_labels, labels)
    d, n = images.astype(np.float64), dusk_images.astype(np.float64)
    assert n.mean() < 0.7 * d.mean()            # darker
    assert n.std() < 0.7 * d.std()              # lower contrast
    # noisier: high-frequency energy relative to the image's contrast
    def rough(x):
        return np.abs(np.diff(x, axis=2)).mean() / x.std()
    assert rough(n) > rough(d)
    fog_images, fog_labels = S.generate(10, "fog", seed=3, size=SIZE)
    np.testing.assert_array_equal(fog_labels, labels[:10])
    assert fog_images.std() < images[:10].std()


def test_mmseg_layout_roundtrip(tmp_path):
    counts = S.write_mmseg_layout(tmp_path, "dusk", n_train=5, n_val=3, seed=7, size=SIZE, chunk=2,
                                  progress=False)
    assert counts == {"train": 5, "val": 3}
    for split, n in counts.items():
        images, labels = S.generate(n, "dusk", seed=7, size=SIZE, split=split)
        img_files = sorted((tmp_path / "img_dir" / split).glob("*.png"))
        ann_files = sorted((tmp_path / "ann_dir" / split).glob("*.png"))
        assert [f.name for f in img_files] == [f.name for f in ann_files] and len(img_files) == n
        for i in range(n):
            np.testing.assert_array_equal(read_label(ann_files[i]), labels[i])
            np.testing.assert_array_equal(read_image(img_files[i]), images[i])
    info = json.loads((tmp_path / "synthetic.json").read_text())
    assert info["style"] == "dusk" and info["classes"] == list(S.CLASSES)


def test_dataset_items_normalised():
    ds = S.SyntheticDataset("day", n=4, seed=1, size=SIZE, split="val")
    images, labels = S.generate(4, "day", seed=1, size=SIZE, split="val")
    x, y = ds[2]
    assert len(ds) == 4
    assert x.shape == (3, *SIZE) and x.dtype == torch.float32
    assert y.shape == SIZE and y.dtype == torch.int64
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = ((images[2] / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), labels[2])
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, *SIZE) and yb.shape == (2, *SIZE)


def test_meta_registered():
    meta = get_meta("synthetic")
    assert meta.classes == S.CLASSES and meta.num_classes == 8 and meta.ignore_index == 255
    assert len(meta.palette) == 8


@pytest.mark.parametrize("kwargs", [dict(style="night"), dict(split="extra"), dict(seed=-1), dict(size=(4, 4))])
def test_bad_arguments(kwargs):
    args = dict(n=2, style="day", seed=0, size=SIZE, split="train")
    args.update(kwargs)
    with pytest.raises(SegrewardError):
        S.generate(**args)
