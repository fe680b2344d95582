"""Dataset formats on tiny fixtures written here (Pillow), checked against numpy written here."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segreward.data import meta as meta_mod
from segreward.data.datasets import (ADE20KDataset, CamVidDataset, CityscapesDataset, FolderDataset, GTA5Dataset,
                                     VOCDataset, build_dataset, camvid_frame, camvid_sequences, dataset_names,
                                     select_frames)
from segreward.data.meta import get_meta, known_datasets
from segreward.errors import SegrewardError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
H, W = 8, 12


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_rgb(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def save_gray(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def expected_image(path) -> np.ndarray:
    """The normalised [3,H,W] image, computed here from Pillow's decode."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


# Cityscapes labelIds -> trainIds, written out independently of segreward.data.meta.
CS_TRAIN = {"road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17,
            "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
            "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31,
            "motorcycle": 32, "bicycle": 33}


def cs_reference(ids: np.ndarray) -> np.ndarray:
    out = np.full(ids.shape, 255, dtype=np.int64)
    for train_id, raw in enumerate(CS_TRAIN.values()):
        out[ids == raw] = train_id
    return out


# ----------------------------------------------------------------------------- meta
def test_meta_ade20k_voc():
    ade = get_meta("ade20k")
    assert ade.num_classes == 150 and ade.reduce_zero_label and ade.classes[0] == "wall" and ade.classes[-1] == "flag"
    voc = get_meta("voc")
    assert voc.num_classes == 21 and voc.classes[0] == "background" and voc.ignore_index == 255
    # The well-known first colours of the VOC colour map.
    assert voc.palette[:6] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128))
    assert len(set(ade.palette)) == 150
    assert {"ade20k", "voc", "camvid", "cityscapes", "gta5", "synthetic"} <= set(known_datasets())


def test_meta_lazy_import(tmp_path, monkeypatch):
    (tmp_path / "fake_lazy_meta_mod.py").write_text(
        "from segreward.data.meta import DatasetMeta, register_meta\n"
        "register_meta(DatasetMeta('fakelazy', ('a', 'b'), ((0, 0, 0), (1, 1, 1))))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(meta_mod._LAZY, "fakelazy", "fake_lazy_meta_mod")
    monkeypatch.setitem(meta_mod._LAZY, "missinglazy", "no_such_module_here_xyz")
    try:
        assert get_meta("fakelazy").classes == ("a", "b")
        with pytest.raises(SegrewardError, match="unknown dataset 'missinglazy'"):
            get_meta("missinglazy")
    finally:
        meta_mod._REGISTRY.pop("fakelazy", None)
        sys.modules.pop("fake_lazy_meta_mod", None)


# ----------------------------------------------------------------------------- folder (mmseg)
def make_folder(root, n=3, split="train", img_suffix=".png", labels=None, nested=False):
    for i in range(n):
        name = f"sub/im{i}" if nested and i == 0 else f"im{i}"
        save_rgb(root / "img_dir" / split / f"{name}{img_suffix}", rgb(i))
        lab = labels[i] if labels is not None else np.random.default_rng(100 + i).integers(0, 3, (H, W))
        save_gray(root / "ann_dir" / split / f"{name}.png", lab)


def test_folder_items_match_reference(tmp_path):
    labels = [np.random.default_rng(i).integers(0, 3, (H, W)) for i in range(3)]
    labels[1][0, :4] = 255
    make_folder(tmp_path, labels=labels, nested=True)
    ds = FolderDataset(tmp_path, "train", img_suffix=".png", classes=["a", "b", "c"])
    assert len(ds) == 3 and ds.meta.num_classes == 3
    assert sorted(ds.names) == ["im1", "im2", "sub/im0"]
    for k, name in enumerate(ds.names):
        image, label = ds[k]
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        assert label.dtype == torch.int64 and label.shape == (H, W)
        i = 0 if name == "sub/im0" else int(name[-1])
        np.testing.assert_allclose(image.numpy(), expected_image(tmp_path / "img_dir/train" / f"{name}.png"), atol=1e-6)
        np.testing.assert_array_equal(label.numpy(), labels[i])
    built = build_dataset("mmseg", tmp_path, "train", img_suffix=".png", classes=3)
    assert len(built) == 3 and built.meta.classes == ("class0", "class1", "class2")


def test_folder_reduce_zero_label_label_map_names(tmp_path):
    raw = np.random.default_rng(0).integers(0, 4, (H, W))
    raw[0, 0] = 255
    make_folder(tmp_path, n=2, labels=[raw, raw], split="val")
    (tmp_path / "val.txt").write_text("im1\n\n")
    ds = FolderDataset(tmp_path, "val", img_suffix=".png", classes=3, reduce_zero_label=True, names="val.txt")
    assert ds.names == ["im1"]
    expect = np.where(raw == 0, 255, raw - 1)
    expect[raw == 255] = 255
    np.testing.assert_array_equal(ds[0][1].numpy(), expect)
    mapped = FolderDataset(tmp_path, "val", img_suffix=".png", classes=2, label_map={0: 1, 1: 0, 2: 255, 3: 255})
    lut = {0: 1, 1: 0, 2: 255, 3: 255, 255: 255}
    np.testing.assert_array_equal(mapped[0][1].numpy(), np.vectorize(lut.get)(raw))


def test_resize_transform_cache_normalisation(tmp_path):
    # 2x2-constant blocks: any nearest / bilinear halving keeps block values.
    lab_small = np.random.default_rng(1).integers(0, 3, (H // 2, W // 2))
    img_small = rgb(5, H // 2, W // 2)
    save_rgb(tmp_path / "img_dir/a.png", img_small.repeat(2, 0).repeat(2, 1))
    save_gray(tmp_path / "ann_dir/a.png", lab_small.repeat(2, 0).repeat(2, 1))
    ds = FolderDataset(tmp_path, None, img_suffix=".png", classes=3, size=(H // 2, W // 2),
                       mean=(0, 0, 0), std=(1, 1, 1))
    image, label = ds[0]
    np.testing.assert_array_equal(label.numpy(), lab_small)
    # Pillow's bilinear antialiases when shrinking; torch's antialiased bilinear is the reference.
    full = torch.from_numpy(img_small.repeat(2, 0).repeat(2, 1).transpose(2, 0, 1).astype(np.float32))[None]
    ref = torch.nn.functional.interpolate(full, size=(H // 2, W // 2), mode="bilinear", antialias=True,
                                          align_corners=False)[0] / 255.0
    np.testing.assert_allclose(image.numpy(), ref.numpy(), atol=1.01 / 255)

    calls = []

    def flip(img, lab):
        calls.append((img.dtype, lab.shape))
        return img[:, ::-1], lab[:, ::-1]

    flipped = FolderDataset(tmp_path, None, img_suffix=".png", classes=3, transform=flip, cache=True)
    img0, lab0 = flipped[0]
    full_lab = lab_small.repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(lab0.numpy(), full_lab[:, ::-1])
    np.testing.assert_allclose(img0.numpy(), expected_image(tmp_path / "img_dir/a.png")[:, :, ::-1], atol=1e-6)
    assert calls == [(np.uint8, (H, W))]
    # Cached: the arrays survive the files; the transform still runs every time.
    (tmp_path / "img_dir/a.png").unlink()
    (tmp_path / "ann_dir/a.png").unlink()
    np.testing.assert_array_equal(flipped[0][1].numpy(), full_lab[:, ::-1])
    assert len(calls) == 2


def test_preload_fills_cache(tmp_path):
    make_folder(tmp_path, n=2)
    ds = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3).preload(progress=False)
    for p in (tmp_path / "img_dir/train").iterdir():
        p.unlink()
    assert ds[1][0].shape == (3, H, W)


# ----------------------------------------------------------------------------- errors
def test_error_image_without_label(tmp_path):
    make_folder(tmp_path, n=3)
    (tmp_path / "ann_dir/train/im1.png").unlink()
    with pytest.raises(SegrewardError, match=r"1 image\(s\) in .*img_dir/train have no label.*im1\.png"):
        FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)


def test_error_label_without_image(tmp_path):
    make_folder(tmp_path, n=3)
    save_gray(tmp_path / "ann_dir/train/orphan.png", np.zeros((H, W)))
    with pytest.raises(SegrewardError, match=r"label\(s\) in .*ann_dir/train have no image.*orphan\.png"):
        FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)


def test_error_many_missing_are_listed_briefly(tmp_path):
    make_folder(tmp_path, n=8)
    for i in range(8):
        (tmp_path / f"ann_dir/train/im{i}.png").unlink()
    save_gray(tmp_path / "ann_dir/train/other.png", np.zeros((H, W)))
    with pytest.raises(SegrewardError, match=r"8 image\(s\).*im0\.png.*and 3 more"):
        FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)


def test_error_size_mismatch(tmp_path):
    make_folder(tmp_path, n=2)
    save_gray(tmp_path / "ann_dir/train/im1.png", np.zeros((H + 2, W)))
    with pytest.raises(SegrewardError, match=r"img_dir/train/im1\.png is 12x8 but its label .*im1\.png is 12x10"):
        FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3, skip_mismatched=True)
    assert ds.names == ["im0"] and caught


def test_error_unreadable_file(tmp_path):
    make_folder(tmp_path, n=2)
    (tmp_path / "img_dir/train/im0.png").write_bytes(b"not an image at all")
    with pytest.raises(SegrewardError, match=r"img_dir/train/im0\.png: cannot read image"):
        FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)
    # Without the load-time check it is caught when the item is read, still naming the file.
    ds = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3, verify=False)
    with pytest.raises(SegrewardError, match=r"im0\.png: cannot read image"):
        ds[0]


def test_error_label_out_of_range_is_lazy(tmp_path):
    labels = [np.zeros((H, W), int), np.zeros((H, W), int)]
    labels[1][2, 3], labels[1][4, 5], labels[1][0, 0] = 7, 3, 255
    make_folder(tmp_path, n=2, labels=labels)
    ds = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3)
    assert ds[0][1].max() == 0
    with pytest.raises(SegrewardError, match=r"ann_dir/train/im1\.png: label values \[3, 7\] out of range.*3 classes"):
        ds[1]
    with pytest.raises(SegrewardError, match=r"im1\.png: label values \[3, 7\]"):
        ds.check_labels(progress=False)


def test_error_empty_and_missing(tmp_path):
    (tmp_path / "img_dir/train").mkdir(parents=True)
    (tmp_path / "ann_dir/train").mkdir(parents=True)
    save_rgb(tmp_path / "img_dir/train/a.png", rgb(0))
    with pytest.raises(SegrewardError, match=r"img_dir/train: no images ending in '\.jpg'"):
        FolderDataset(tmp_path, "train", classes=3)
    with pytest.raises(SegrewardError, match=r"img_dir/val: image folder not found"):
        FolderDataset(tmp_path, "val", classes=3)
    with pytest.raises(SegrewardError, match="needs its classes"):
        FolderDataset(tmp_path, "train", img_suffix=".png")
    with pytest.raises(SegrewardError, match="unknown dataset format 'nope'.*camvid"):
        build_dataset("nope", tmp_path)
    with pytest.raises(SegrewardError, match="dataset .folder.: unknown option.*bogus.*valid:.*img_suffix.*size"):
        build_dataset("folder", tmp_path, "train", classes=3, bogus=1)
    assert {"folder", "mmseg", "cityscapes", "gta5", "ade20k", "voc", "camvid", "idd_lite"} == set(dataset_names())


# ----------------------------------------------------------------------------- Cityscapes
def make_cityscapes(root, kind="labelIds"):
    ids = {}
    for k, (city, stem) in enumerate([("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]):
        save_rgb(root / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png", rgb(k))
        raw = np.random.default_rng(k).integers(0, 34, (H, W))
        ids[stem] = raw
        save_gray(root / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png", raw)
        save_rgb(root / f"gtFine/train/{city}/{stem}_gtFine_color.png", rgb(9))  # ignored by suffix
        if kind == "labelTrainIds":
            save_gray(root / f"gtFine/train/{city}/{stem}_gtFine_labelTrainIds.png", cs_reference(raw))
    return ids


def test_cityscapes_label_ids(tmp_path):
    ids = make_cityscapes(tmp_path)
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert ds.label_type == "labelIds" and len(ds) == 2 and ds.meta.num_classes == 19
    for k, name in enumerate(ds.names):
        stem = name.split("/")[-1]
        np.testing.assert_array_equal(ds[k][1].numpy(), cs_reference(ids[stem]))


def test_cityscapes_train_ids_auto(tmp_path):
    ids = make_cityscapes(tmp_path, "labelTrainIds")
    ds = CityscapesDataset(tmp_path, "train")
    assert ds.label_type == "labelTrainIds"
    np.testing.assert_array_equal(ds[1][1].numpy(), cs_reference(ids["bremen_000001_000019"]))
    assert CityscapesDataset(tmp_path, "train", label_type="labelIds").label_type == "labelIds"


# ----------------------------------------------------------------------------- GTA5
def test_gta5(tmp_path):
    raws = []
    for i in range(3):
        save_rgb(tmp_path / f"images/{i:05d}.png", rgb(i))
        raw = np.random.default_rng(i).integers(0, 35, (H, W))
        raws.append(raw)
        save_gray(tmp_path / f"labels/{i:05d}.png", raw)
    ds = build_dataset("gta5", tmp_path)
    assert len(ds) == 3 and ds.meta.classes[0] == "road"
    np.testing.assert_array_equal(ds[2][1].numpy(), cs_reference(raws[2]))
    (tmp_path / "val.txt").write_text("00001\n")
    val = GTA5Dataset(tmp_path, "val")
    assert val.names == ["00001"]
    np.testing.assert_array_equal(val[0][1].numpy(), cs_reference(raws[1]))
    with pytest.raises(SegrewardError, match="GTA5 split 'test'"):
        GTA5Dataset(tmp_path, "test")
    # MMSegmentation's converted train-id files next to the raw ones.
    for i in range(3):
        save_gray(tmp_path / f"labels/{i:05d}_labelTrainIds.png", cs_reference(raws[i]))
    assert GTA5Dataset(tmp_path).label_type == "labelTrainIds"
    raw_ids = GTA5Dataset(tmp_path, label_type="labelIds")
    assert len(raw_ids) == 3
    np.testing.assert_array_equal(raw_ids[0][1].numpy(), cs_reference(raws[0]))


# ----------------------------------------------------------------------------- ADE20K
def test_ade20k(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raws = {}
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(2):
            name = f"ADE_{prefix}_{i:08d}"
            save_rgb(base / f"images/{split}/{name}.jpg", rgb(i))
            raw = np.random.default_rng(i).integers(0, 151, (H, W))
            raws[name] = raw
            save_gray(base / f"annotations/{split}/{name}.png", raw)
    ds = build_dataset("ade20k", tmp_path, "val")  # the parent folder and a short split name work
    assert ds.split == "validation" and len(ds) == 2 and ds.meta.num_classes == 150
    expect = np.where(raws["ADE_val_00000001"] == 0, 255, raws["ADE_val_00000001"] - 1)
    np.testing.assert_array_equal(ds[1][1].numpy(), expect)
    np.testing.assert_allclose(ds[1][0].numpy(), expected_image(base / "images/validation/ADE_val_00000001.jpg"),
                               atol=1e-5)
    assert len(ADE20KDataset(base, "training")) == 2


# ----------------------------------------------------------------------------- VOC
def save_palette_png(path, idx):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(idx.astype(np.uint8), "P")
    pal = [0] * 768
    for i, c in enumerate(get_meta("voc").palette):
        pal[3 * i:3 * i + 3] = c
    pal[765:768] = (224, 224, 192)  # VOC's border colour at index 255
    img.putpalette(pal)
    img.save(path)


def test_voc_palette_pngs(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    idx = {}
    for i, name in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        save_rgb(base / f"JPEGImages/{name}.jpg", rgb(i))
        lab = np.random.default_rng(i).integers(0, 21, (H, W))
        lab[0, :] = 255  # border
        idx[name] = lab
        save_palette_png(base / f"SegmentationClass/{name}.png", lab)
    save_rgb(base / "JPEGImages/2008_999999.jpg", rgb(7))  # an image without segmentation: not listed
    (base / "ImageSets/Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000063\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    assert Image.open(base / "SegmentationClass/2007_000032.png").mode == "P"
    ds = build_dataset("voc", tmp_path, "train")
    assert ds.names == ["2007_000032", "2007_000063"] and ds.meta.num_classes == 21
    np.testing.assert_array_equal(ds[1][1].numpy(), idx["2007_000063"])
    assert len(VOCDataset(base, "val")) == 1
    with pytest.raises(SegrewardError, match="VOC split 'test'"):
        VOCDataset(base, "test")
    (base / "ImageSets/Segmentation/bad.txt").write_text("2007_000032\n2008_999999\n")
    with pytest.raises(SegrewardError, match=r"have no label .*SegmentationClass: 2008_999999\.png"):
        VOCDataset(base, "bad")


# ----------------------------------------------------------------------------- CamVid
CAMVID_FIXTURE = {
    "train": ["0001TP_%06d" % f for f in range(6690, 6690 + 9 * 30, 30)]
    + ["0006R0_f%05d" % f for f in (930, 960, 990)] + ["0016E5_%05d" % f for f in (390, 420)],
    "val": ["0016E5_%05d" % f for f in (405, 435)],
}


def make_camvid(root):
    labels = {}
    for split, names in CAMVID_FIXTURE.items():
        for k, name in enumerate(names):
            save_rgb(root / split / f"{name}.png", rgb(k))
            lab = np.random.default_rng(k).integers(0, 12, (H, W))  # 11 = void
            labels[name] = lab
            save_gray(root / f"{split}annot" / f"{name}.png", lab)
    return labels


def test_camvid_frame_names():
    assert camvid_frame("0006R0_f02310.png") == ("0006R0", 2310)
    assert camvid_frame("0001TP_006690") == ("0001TP", 6690)
    assert camvid_frame("Seq05VD_f00120") == ("Seq05VD", 120)
    with pytest.raises(SegrewardError, match="not a CamVid frame name"):
        camvid_frame("image.png")


def test_camvid_labels_and_sequences(tmp_path):
    labels = make_camvid(tmp_path)
    assert camvid_sequences(tmp_path, "train") == {"0001TP": 9, "0006R0": 3, "0016E5": 2}
    ds = build_dataset("camvid", tmp_path, "train")
    assert len(ds) == 14 and ds.meta.num_classes == 11
    name = ds.names[0]
    np.testing.assert_array_equal(ds[0][1].numpy(), np.where(labels[name] == 11, 255, labels[name]))
    day = CamVidDataset(tmp_path, "train+val", exclude_sequences="0001TP")
    assert day.sequences == {"0006R0": 3, "0016E5": 4}
    with pytest.raises(SegrewardError, match=r"no frames of sequence '0005VD'.*0001TP \(9\)"):
        CamVidDataset(tmp_path, "train", sequences=["0005VD"])


def test_camvid_frame_split(tmp_path):
    make_camvid(tmp_path)
    tune = CamVidDataset(tmp_path, "train", sequences="0001TP", frames=(0, 2 / 3))
    held = CamVidDataset(tmp_path, "train", sequences="0001TP", frames=(2 / 3, 1))
    dusk = CAMVID_FIXTURE["train"][:9]  # already in frame order
    assert tune.names == dusk[:6] and held.names == dusk[6:]
    assert max(f for _, f in tune.frame_numbers()) < min(f for _, f in held.frame_numbers())
    # Frame order is numeric, not the order the names are given in.
    shuffled = [dusk[i] for i in (4, 0, 8, 2, 6, 1, 7, 3, 5)]
    assert sorted(select_frames(shuffled, frames=(0, 1 / 3))) == dusk[:3]
    # Each sequence is split on its own; the parts partition it for any cut.
    names = CAMVID_FIXTURE["train"]
    for cut in (0.1, 0.5, 0.77):
        a, b = select_frames(names, frames=(0, cut)), select_frames(names, frames=(cut, 1))
        assert not set(a) & set(b) and sorted(a + b) == sorted(names)
    with pytest.raises(SegrewardError, match="frames="):
        select_frames(names, frames=(0.5, 0.2))
    with pytest.raises(SegrewardError, match="keeps no frame"):
        CamVidDataset(tmp_path, "train", sequences="0016E5", frames=(0, 0.1))


def test_camvid_out_of_range_and_resize(tmp_path):
    make_camvid(tmp_path)
    bad = np.zeros((H, W), np.uint8)
    bad[1, 1] = 12
    save_gray(tmp_path / "trainannot/0006R0_f00960.png", bad)
    ds = CamVidDataset(tmp_path, "train", sequences="0006R0", size=(4, 6))
    assert ds[0][0].shape == (3, 4, 6) and ds[0][1].shape == (4, 6)
    with pytest.raises(SegrewardError, match=r"0006R0_f00960\.png: label values \[12\] out of range"):
        ds[1]


def test_mean_std_scales_and_float_transform(tmp_path):
    make_folder(tmp_path, n=1)
    path = tmp_path / "img_dir/train/im0.png"
    mm = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3,
                       mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    np.testing.assert_allclose(mm[0][0].numpy(), expected_image(path), atol=1e-4)
    as_float = FolderDataset(tmp_path, "train", img_suffix=".png", classes=3,
                             transform=lambda im, lb: (im.astype(np.float64), lb))
    np.testing.assert_allclose(as_float[0][0].numpy(), expected_image(path), atol=1e-5)
