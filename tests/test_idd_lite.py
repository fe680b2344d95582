"""IDD Lite (Cityscapes-like layout, sequence folders) and the CamVid -> IDD Lite class map, on
tiny fixtures written here; expected values are written out here, not taken from segreward."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segreward.data.datasets import (CamVidDataset, IDDLiteDataset, build_dataset, idd_sequences,
                                     split_sequences)
from segreward.errors import SegrewardError

H, W = 6, 8
# CamVid's SegNet ids (0 Sky ... 10 Bicyclist, 11 void) -> IDD Lite's level-1 ids, from the data
# README's table: Road 0, Pavement 1, Pedestrian/Bicyclist 2, Car 3, Pole/SignSymbol/Fence 4,
# Building/Tree 5, Sky 6, void 255.
CAMVID_TO_IDD = {"Sky": 6, "Building": 5, "Pole": 4, "Road": 0, "Pavement": 1, "Tree": 5, "SignSymbol": 4,
                 "Fence": 4, "Car": 3, "Pedestrian": 2, "Bicyclist": 2}


def make_idd(root, frames=None, test=3):
    """``frames``: {sequence folder: number of labelled frames}; ``test`` unlabelled frames."""
    frames = frames or {"0": 2, "1": 3, "2": 1, "10": 4}
    labels = {}
    for seq, n in frames.items():
        for k in range(n):
            name = f"{seq}/{1000 * int(seq) + k:06d}"
            rng = np.random.default_rng([int(seq), k])
            label = rng.integers(0, 7, (H, W)).astype(np.uint8)
            label[0, 0] = 255
            for folder, suffix, arr in (("leftImg8bit", "_image.jpg", rng.integers(0, 256, (H, W, 3), np.uint8)),
                                        ("gtFine", "_label.png", label)):
                path = root / folder / "train" / f"{name}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
            labels[name] = label
    for k in range(test):
        path = root / "leftImg8bit" / "test" / str(500 + k) / f"{k:06d}_image.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(path)
    return labels


def test_idd_lite_layout_labels_and_sequences(tmp_path):
    labels = make_idd(tmp_path)
    ds = build_dataset("idd_lite", tmp_path, "train")
    assert len(ds) == 10 and ds.meta.num_classes == 7 and ds.meta.classes[0] == "drivable"
    assert ds.names[:2] == ["0/000000", "0/000001"] and ds.labelled
    for i, name in enumerate(ds.names):
        np.testing.assert_array_equal(ds[i][1].numpy(), labels[name])
    assert idd_sequences(tmp_path) == {"0": 2, "1": 3, "2": 1, "10": 4}  # numeric order
    some = IDDLiteDataset(tmp_path, "train", sequences=["1", "10"])
    assert some.sequences == {"1": 3, "10": 4} and all(n.split("/")[0] in ("1", "10") for n in some.names)
    rest = IDDLiteDataset(tmp_path, "train", exclude_sequences="10")
    assert len(rest) == 6
    with pytest.raises(SegrewardError, match=r"no sequence folder\(s\) 7; 4 there \(0, 1, 2, 10\)"):
        IDDLiteDataset(tmp_path, "train", sequences=["7"])


def test_idd_lite_unlabelled_split_is_all_ignore(tmp_path):
    make_idd(tmp_path)
    test = build_dataset("idd_lite", tmp_path, "test", size=(4, 6))
    assert not test.labelled and len(test) == 3
    x, y = test[1]
    assert tuple(x.shape) == (3, 4, 6) and (y == 255).all()
    # a labelled split can be read without its labels too
    assert (IDDLiteDataset(tmp_path, "train", labelled=False)[0][1] == 255).all()


def test_camvid_read_as_idd_classes_by_a_named_label_map(tmp_path):
    from segreward.data.meta import CAMVID_CLASSES
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    raw = (np.arange(H * W) % 12).reshape(H, W).astype(np.uint8)  # every id 0..11
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "train" / "0001TP_006690.png")
    Image.fromarray(raw).save(tmp_path / "trainannot" / "0001TP_006690.png")
    ds = build_dataset("camvid", tmp_path, "train", label_map="camvid_to_idd")
    lut = [CAMVID_TO_IDD[c] for c in CAMVID_CLASSES] + [255]
    np.testing.assert_array_equal(ds[0][1].numpy(), np.array(lut)[raw])
    assert ds.meta.classes == ("drivable", "non-drivable", "living things", "vehicles", "road-side objects",
                               "far objects", "sky")
    assert CamVidDataset(tmp_path, "train").meta.num_classes == 11  # unchanged without the map
    with pytest.raises(SegrewardError, match="unknown named label map.*camvid_to_idd"):
        build_dataset("camvid", tmp_path, "train", label_map="camvid_to_cityscapes")
    with pytest.raises(SegrewardError, match="maps camvid label ids"):
        build_dataset("folder", tmp_path, None, img_dir="train", ann_dir="trainannot", meta="voc",
                      label_map="camvid_to_idd")


def test_split_sequences_keeps_sequences_whole():
    counts = {str(i): n for i, n in enumerate([5, 1, 7, 3, 2, 9, 4, 4, 6, 1])}  # 42 frames
    parts = split_sequences(counts, {"evaluation": 15, "selection": 10, "pool": -1}, seed=3)
    assert sorted(s for v in parts.values() for s in v) == sorted(counts)  # a partition
    frames = {k: sum(counts[s] for s in v) for k, v in parts.items()}
    assert frames["evaluation"] >= 15 and frames["selection"] >= 10 and sum(frames.values()) == 42
    assert parts == split_sequences(counts, {"evaluation": 15, "selection": 10, "pool": -1}, seed=3)
    assert parts != split_sequences(counts, {"evaluation": 15, "selection": 10, "pool": -1}, seed=4)
    with pytest.raises(SegrewardError, match="needs 50 frames"):
        split_sequences(counts, {"evaluation": 50})


def test_mmseg_idd_lite_and_camvid_idd_datasets(tmp_path):
    pytest.importorskip("mmseg")
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope("mmseg"):
        _check_mmseg_datasets(tmp_path)


def _check_mmseg_datasets(tmp_path):
    from mmseg.registry import DATASETS

    import segreward.mmseg  # noqa: F401
    labels = make_idd(tmp_path / "idd")
    pipe = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]
    ds = DATASETS.build(dict(type="IDDLiteDataset", data_root=str(tmp_path / "idd"), pipeline=pipe,
                             data_prefix=dict(img_path="leftImg8bit/train", seg_map_path="gtFine/train")))
    assert len(ds) == 10 and ds.metainfo["classes"][6] == "sky"
    item = ds[0]
    name = item["img_path"].split("train/")[1][: -len("_image.jpg")]
    np.testing.assert_array_equal(item["gt_seg_map"], labels[name])
    cam = tmp_path / "camvid"
    (cam / "train").mkdir(parents=True)
    (cam / "trainannot").mkdir()
    raw = (np.arange(H * W) % 12).reshape(H, W).astype(np.uint8)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(cam / "train" / "0001TP_006690.png")
    Image.fromarray(raw).save(cam / "trainannot" / "0001TP_006690.png")
    src = DATASETS.build(dict(type="CamVidIDDDataset", data_root=str(cam), pipeline=pipe,
                              data_prefix=dict(img_path="train", seg_map_path="trainannot")))
    from segreward.data.meta import CAMVID_CLASSES
    lut = np.array([CAMVID_TO_IDD[c] for c in CAMVID_CLASSES] + [255])
    np.testing.assert_array_equal(src[0]["gt_seg_map"], lut[raw])
    assert tuple(src.metainfo["classes"]) == tuple(ds.metainfo["classes"])
    # the CamVid dataset itself is unchanged (png suffixes, 11 classes)
    assert len(DATASETS.get("CamVidDataset").METAINFO["classes"]) == 11


def test_idd_lite_names_from_a_list_or_file(tmp_path):
    make_idd(tmp_path)
    listed = tmp_path / "tune.txt"
    listed.write_text("10/010002\n0/000001\n")
    ds = build_dataset("idd_lite", tmp_path, "train", names=str(listed))
    assert ds.names == ["10/010002", "0/000001"]  # the file's order
    assert IDDLiteDataset(tmp_path, "train", names=["1/001000"]).names == ["1/001000"]
    with pytest.raises(SegrewardError, match=r"tune2.txt: 1 name\(s\) not among .*9/000001"):
        (tmp_path / "tune2.txt").write_text("0/000000\n9/000001\n")
        IDDLiteDataset(tmp_path, "train", names=tmp_path / "tune2.txt")


def test_recipe_configs_name_existing_split_lists():
    from pathlib import Path

    from segreward.engine import load_config
    root = Path(__file__).resolve().parents[1]
    for name in ("idd_1_source", "idd_2_ce_finetune"):
        cfg = load_config(root / "configs" / f"{name}.yaml")
        specs = [cfg.data.train] + list(cfg.data.val.values())
        for spec in specs:
            names = spec.get("names") if isinstance(spec, dict) else None
            if names:
                lines = (root / names).read_text().split()
                assert lines and all("/" in n for n in lines)
    tune = (root / "configs/data/idd_lite_split0/tune64.txt").read_text().split()
    sel = set((root / "configs/data/idd_lite_split0/selection.txt").read_text().split())
    ev = set((root / "configs/data/idd_lite_split0/evaluation.txt").read_text().split())
    seqs = lambda ns: {n.split("/")[0] for n in ns}  # noqa: E731
    assert len(tune) == 64 and not (seqs(tune) & seqs(sel)) and not (seqs(tune) & seqs(ev)) and not (seqs(sel) & seqs(ev))
    assert len(ev) >= 700 and len(sel) >= 300
