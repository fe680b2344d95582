"""RunWriter writes mmengine's scalars.json format; checked with Python's json module and
with TensorBoard's own event reader (independent of our reader)."""

import json
import math

import pytest

from segreward.errors import SegrewardError
from segreward.runlog import RunWriter


def _lines(run_dir):
    return (run_dir / "vis_data" / "scalars.json").read_text().splitlines()


def test_train_and_val_lines_match_mmengine_key_order(tmp_path):
    with RunWriter(tmp_path) as w:
        w.log(50, {"data_time": 0.01, "loss": 0.9, "decode.loss_ce": 0.6, "aux.loss_ce": 0.3,
                   "decode.acc_seg": 41.5, "time": 0.4, "lr": 0.01, "memory": 5000})
        w.log(2000, {"aAcc": 87.2, "mIoU": 54.2, "mAcc": 73.2, "data_time": 0.002, "time": 0.1},
              mode="val")
    train, val = (json.loads(s, object_pairs_hook=list) for s in _lines(tmp_path))
    assert [k for k, _ in train] == ["lr", "data_time", "loss", "decode.loss_ce", "aux.loss_ce",
                                     "decode.acc_seg", "time", "iter", "memory", "step"]
    assert dict(train)["iter"] == 50 and dict(train)["step"] == 50
    assert [k for k, _ in val] == ["aAcc", "mIoU", "mAcc", "data_time", "time", "step"]
    assert dict(val)["step"] == 2000


def test_non_finite_values_round_trip_through_python_json(tmp_path):
    with RunWriter(tmp_path) as w:
        w.log(1, {"lr": 0.1, "loss": float("nan"), "loss_x": float("inf"), "loss_y": -math.inf})
    line = json.loads(_lines(tmp_path)[0])
    assert math.isnan(line["loss"]) and line["loss_x"] == math.inf and line["loss_y"] == -math.inf


def test_tensor_and_numpy_scalars_are_plain_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with RunWriter(tmp_path) as w:
        w.log(3, {"lr": np.float32(0.5), "loss": torch.tensor(1.25), "memory": np.int64(7)})
    assert json.loads(_lines(tmp_path)[0]) == {"lr": 0.5, "loss": 1.25, "iter": 3, "memory": 7,
                                               "step": 3}


def test_each_line_is_on_disk_before_close(tmp_path):
    w = RunWriter(tmp_path)
    w.log(1, {"lr": 0.1, "loss": 1.0})
    assert len(_lines(tmp_path)) == 1  # flushed, not buffered until close
    w.close()
    with pytest.raises(SegrewardError, match="closed"):
        w.log(2, {"loss": 1.0})


def test_resume_after_a_killed_write_starts_a_new_line(tmp_path):
    vis = tmp_path / "vis_data"
    vis.mkdir()
    (vis / "scalars.json").write_text('{"lr": 0.1, "loss": 1.0, "iter": 1, "step": 1}\n{"lr": 0.1, "lo')
    with RunWriter(tmp_path) as w:
        w.log(2, {"lr": 0.1, "loss": 0.5})
    lines = _lines(tmp_path)
    assert lines[1] == '{"lr": 0.1, "lo'
    assert json.loads(lines[2])["step"] == 2


def test_validation_line_with_training_key_is_refused(tmp_path):
    with RunWriter(tmp_path) as w:
        with pytest.raises(SegrewardError, match="training key"):
            w.log(10, {"mIoU": 50.0, "loss": 0.3}, mode="val")
        with pytest.raises(SegrewardError, match="mode"):
            w.log(10, {"mIoU": 50.0}, mode="eval")
        with pytest.raises(SegrewardError, match="only numbers"):
            w.log(10, {"mIoU": "high"}, mode="val")


def test_tensorboard_events_read_back_with_tensorboard(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with RunWriter(tmp_path, tensorboard=True) as w:
        w.log(50, {"lr": 0.01, "loss": 0.75})
        w.log(100, {"mIoU": 40.5}, mode="val")
    acc = ea_mod.EventAccumulator(str(tmp_path / "vis_data"))
    acc.Reload()
    assert {"lr", "loss", "iter", "mIoU"} <= set(acc.Tags()["scalars"])
    (ev,) = acc.Scalars("mIoU")
    assert ev.step == 100 and ev.value == pytest.approx(40.5)
