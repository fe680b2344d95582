"""`segreward stats freq|weights` through segreward.cli.main: exit codes, files, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segreward.cli import main


@pytest.fixture()
def labels(tmp_path):
    root = tmp_path / "ann"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(4):
        a = np.zeros((16, 40), np.uint8)
        a[:, 10:] = 1
        a[8:, 25:] = 3
        a[0, : 2 + i] = 255
        a[rng.random(a.shape) < 0.02] = 0
        Image.fromarray(a, "L").save(root / f"{i}.png")
        arrays.append(a)
    return root, arrays


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("segreward stats: error: ")
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_freq_then_weights(labels, tmp_path, capsys):
    root, arrays = labels
    out = tmp_path / "out"
    rc = main(["stats", "freq", str(root), "--num-classes", "5", "--out", str(out), "--workers", "1", "--plot",
               "--class-names", "a,b,c,d,e"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "total" in stdout and "frequencies.json" in stdout and "absent" in stdout
    data = json.loads((out / "frequencies.json").read_text())
    ref = [int(sum((a == c).sum() for a in arrays)) for c in range(5)]
    assert data["counts"] == ref
    assert data["class_names"] == ["a", "b", "c", "d", "e"]
    assert data["total_pixels"] == sum(ref)
    assert data["options"]["num_classes"] == 5
    assert (out / "frequencies.csv").exists() and (out / "frequencies.png").stat().st_size > 0

    rc = main(["stats", "weights", str(out / "frequencies.json"), "--method", "inv_freq"])
    assert rc == 0
    captured = capsys.readouterr()
    line = [s for s in captured.out.splitlines() if s.startswith("class_weight=[")]
    assert len(line) == 1
    assert "zero pixels" in captured.err  # classes 2 and 4 never occur: one warning line
    weights = json.loads((out / "weights.json").read_text())["weights"]
    present = np.array(ref) > 0
    raw = np.where(present, sum(ref) / np.maximum(ref, 1), 0.0)
    raw[~present] = raw[present].max()
    np.testing.assert_allclose(weights, 5 * raw / raw.sum())
    assert line[0] == "class_weight=[" + ", ".join(f"{w:.4f}" for w in weights) + "]"

    from segreward.stats import load_class_weights

    assert load_class_weights(out / "weights.json", num_classes=5) == pytest.approx(weights)


def test_weights_out_folder_and_options(labels, tmp_path, capsys):
    root, _ = labels
    out = tmp_path / "o"
    assert main(["stats", "freq", str(root), "--num-classes", "4", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stats", "weights", str(out), "--method", "cvc", "--smooth", "0.2", "--max-weight", "1.2",
                 "--zero-weight", "0", "--out", str(tmp_path / "w")]) == 0
    data = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert max(data["weights"]) <= 1.2 and data["weights"][2] == 0.0
    assert data["params"] == {"smooth": 0.2, "max_weight": 1.2, "zero_weight": 0.0, "normalize": True}


def test_dataset_name_sets_defaults(tmp_path, capsys):
    root = tmp_path / "camvid"
    root.mkdir()
    a = np.full((8, 8), 11, np.uint8)  # CamVid void (11) -> ignored via the dataset's label map
    a[:4] = 3
    Image.fromarray(a, "L").save(root / "x.png")
    assert main(["stats", "freq", str(root), "--class-names", "camvid", "--out", str(tmp_path), "--strict"]) == 0
    data = json.loads((tmp_path / "frequencies.json").read_text())
    assert data["num_classes"] == 11 and data["class_names"][3] == "Road"
    assert data["counts"][3] == 32 and data["ignored_pixels"] == 32


def test_errors_are_one_line(labels, tmp_path, capsys):
    root, _ = labels
    # empty folder
    (tmp_path / "empty").mkdir()
    assert main(["stats", "freq", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path / "empty"), "'.png'")
    # out of range with --strict
    assert main(["stats", "freq", str(root), "--num-classes", "2", "--strict", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, ".png: label values 3", "--strict")
    # corrupt file: stop, then skip with a count
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["stats", "freq", str(root), "--num-classes", "4", "--out", str(tmp_path), "--workers", "2"]) == 2
    _one_line_error(capsys, "bad.png", "--skip-bad")
    assert main(["stats", "freq", str(root), "--num-classes", "4", "--out", str(tmp_path), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad file(s); first: " in captured.err and "bad.png" in captured.err
    (root / "bad.png").unlink()
    # RGB without palette
    Image.fromarray(np.zeros((4, 4, 3), np.uint8), "RGB").save(root / "rgb.png")
    assert main(["stats", "freq", str(root), "--num-classes", "4", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "rgb.png", "palette")
    # unknown dataset name / weights file problems
    assert main(["stats", "freq", str(root), "--class-names", "nosuchset", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "'nosuchset'", "cityscapes")
    assert main(["stats", "weights", str(tmp_path / "nope.json")]) == 2
    _one_line_error(capsys, "nope.json", "segreward stats freq")


def test_rgb_with_palette_file(tmp_path, capsys):
    root = tmp_path / "rgb"
    root.mkdir()
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:3] = (255, 0, 0)
    rgb[3:, :2] = (0, 0, 255)
    Image.fromarray(rgb, "RGB").save(root / "c.png")
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps({"0,0,0": 0, "255,0,0": 1, "0,0,255": 255}))
    assert main(["stats", "freq", str(root), "--palette", str(palette), "--num-classes", "2",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "frequencies.json").read_text())
    assert data["counts"] == [12, 18] and data["ignored_pixels"] == 6


def test_label_map_inline(tmp_path, capsys):
    root = tmp_path / "ids"
    root.mkdir()
    a = np.array([[7, 7, 8, 33], [0, 0, 7, 8]], np.uint8)
    Image.fromarray(a, "L").save(root / "a_labelIds.png")
    assert main(["stats", "freq", str(root), "--suffix", "_labelIds.png", "--label-map", "7:0,8:1",
                 "--ignore-unlisted", "--num-classes", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "frequencies.json").read_text())
    assert data["counts"] == [3, 2] and data["ignored_pixels"] == 3
    assert main(["stats", "freq", str(root), "--label-map", "7-0", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "RAW:TRAIN")
