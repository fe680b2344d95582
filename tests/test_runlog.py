"""Reading mmengine scalars.json files written here in mmengine's exact format (json.dumps of
the dicts mmengine's LoggerHook/LogProcessor build), checked against the dicts themselves and
against pandas.read_json as an independent reader."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from segreward.errors import SegrewardError
from segreward.runlog import RunLogWarning, RunWriter, clean_logs, find_sources, load_run


def train_line(step, loss, **extra):
    d = {"lr": 0.01, "data_time": 0.005, "loss": loss, "decode.loss_ce": 0.7 * loss,
         "decode.acc_seg": 40.0 + step / 100, "aux.loss_ce": 0.3 * loss, "aux.acc_seg": 30.0,
         "time": 0.42, "iter": step, "memory": 5000, "step": step}
    d.update(extra)
    return d


def val_line(step, miou):
    return {"aAcc": 87.2, "mIoU": miou, "mAcc": 73.2, "data_time": 0.002, "time": 0.16, "step": step}


def write(path, dicts, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in dicts:
            f.write(json.dumps(d) + "\n")  # what mmengine's LocalVisBackend._dump does
        f.write(tail)
    return path


def simple_run(tmp_path, name="run"):
    lines = []
    for s in range(50, 401, 50):
        lines.append(train_line(s, 1.0 / s))
        if s % 200 == 0:
            lines.append(val_line(s, s / 10))
    return write(tmp_path / name / "20240101_000000" / "vis_data" / "scalars.json", lines), lines


def test_train_and_val_split_matches_the_written_dicts(tmp_path):
    path, lines = simple_run(tmp_path)
    run = load_run(path)
    train = [d for d in lines if "loss" in d]
    val = [d for d in lines if "mIoU" in d]
    assert list(run.loss.columns) == ["step"] + [k for k in train[0] if k != "step"]
    assert run.loss["step"].tolist() == [d["step"] for d in train]
    np.testing.assert_allclose(run.loss["decode.loss_ce"], [d["decode.loss_ce"] for d in train])
    assert list(run.metrics.columns) == ["step", "aAcc", "mIoU", "mAcc", "data_time", "time"]
    assert run.metrics["step"].tolist() == [200, 400]
    assert run.metrics["mIoU"].tolist() == [20.0, 40.0]
    assert run.metric_names == ["aAcc", "mIoU", "mAcc"]
    assert not run.by_epoch and run.x == "iter" and run.name == "run"


def test_same_tables_as_pandas_read_json_on_a_clean_file(tmp_path):
    path, _ = simple_run(tmp_path)
    ref = pd.read_json(path, lines=True)
    ref_train = ref[ref["loss"].notna()].dropna(axis=1, how="all").reset_index(drop=True)
    run = load_run(path)
    pd.testing.assert_frame_equal(run.loss[ref_train.columns], ref_train, check_dtype=False)


@pytest.mark.parametrize("where", ["vis_data", "run", "work_dir", "file"])
def test_path_forms(tmp_path, where):
    path, _ = simple_run(tmp_path)
    arg = {"file": path, "vis_data": path.parent, "run": path.parent.parent,
           "work_dir": tmp_path / "run"}[where]
    assert find_sources(arg) == ("scalars", [path])
    assert load_run(arg).name == "run"


def test_resumed_run_in_two_timestamp_folders_keeps_the_last_value_per_step(tmp_path):
    wd = tmp_path / "work_dir"
    first = [train_line(s, 1.0) for s in (50, 100, 150, 200, 250)] + [val_line(200, 30.0)]
    # resumed from the checkpoint at 200: steps 250.. are logged again with new values
    second = [train_line(s, 2.0) for s in (250, 300, 350, 400)] + [val_line(400, 35.0)]
    p1 = write(wd / "20240101_090000" / "vis_data" / "scalars.json", first)
    p2 = write(wd / "20240102_080000" / "vis_data" / "scalars.json", second)
    os.utime(p1, (2e9, 2e9))  # newer mtime on the older folder: name order must win
    run = load_run(wd)
    assert run.sources == [str(p1), str(p2)]
    assert run.loss["step"].tolist() == [50, 100, 150, 200, 250, 300, 350, 400]
    assert run.loss.set_index("step")["loss"].to_dict()[250] == 2.0
    assert run.loss.set_index("step")["loss"].to_dict()[200] == 1.0
    assert run.metrics["mIoU"].tolist() == [30.0, 35.0]


def test_truncated_last_line_blank_lines_and_non_finite_values(tmp_path):
    path = tmp_path / "scalars.json"
    path.write_text(
        json.dumps(train_line(50, 1.0)) + "\n\n   \n"
        + '{"lr": 0.01, "loss": NaN, "decode.loss_ce": Infinity, "iter": 100, "step": 100}\n'
        + json.dumps(val_line(100, -math.inf)) + "\n"
        + '{"lr": 0.01, "data_time": 0.005, "loss": 0.'
    )
    with pytest.warns(RunLogWarning, match="truncated last line"):
        run = load_run(path)
    assert run.loss["step"].tolist() == [50, 100]
    assert math.isnan(run.loss["loss"][1]) and run.loss["decode.loss_ce"][1] == math.inf
    assert run.metrics["mIoU"][0] == -math.inf
    assert any("truncated" in n for n in run.notes)


def test_broken_line_in_the_middle_is_skipped_with_its_line_number(tmp_path):
    path = write(tmp_path / "scalars.json", [train_line(50, 1.0)],
                 tail='{"lr": 0.1, "lo{"lr": 0.01, "loss": 2.0, "iter": 100, "step": 100}\n'
                 + json.dumps(train_line(150, 3.0)) + "\n")
    with pytest.warns(RunLogWarning, match=r"scalars.json:2: skipped unreadable line"):
        run = load_run(path)
    assert run.loss["step"].tolist() == [50, 150]


def test_version_specific_keys(tmp_path):
    old = {"lr": 0.01, "data_time": 0.01, "loss": 1.0, "time": 0.4, "memory": 100, "step": 50}
    new = {"base_lr": 0.01, "lr": 0.01, "data_time": 0.01, "loss": 0.9, "decode.loss_ce": 0.9,
           "time": 0.4, "iter": 100, "memory": 100, "step": 100}
    hier = {"train/lr": 0.01, "train/loss": 0.8, "step": 150}
    path = write(tmp_path / "scalars.json", [old, new, hier, {"val/mIoU": 12.5, "step": 150}])
    run = load_run(path)
    assert run.loss["step"].tolist() == [50, 100, 150]
    assert run.loss["loss"].tolist() == [1.0, 0.9, 0.8]
    assert math.isnan(run.loss["iter"][0]) and math.isnan(run.loss["base_lr"][0])
    assert run.metrics.to_dict("list") == {"step": [150], "mIoU": [12.5]}


def epoch_run(tmp_path):
    lines = []
    ipe = 120  # iterations per epoch; logged every 50
    for e in (1, 2, 3):  # mmengine logs every 50 iterations within each epoch
        for inner in (50, 100):
            it = (e - 1) * ipe + inner
            lines.append(train_line(it, 1.0, epoch=e))
    for e in (1, 2, 3):
        lines.insert(sum(1 for d in lines if d["step"] <= e * ipe),
                     {"accuracy/top1": 50.0 + e, "accuracy/top5": 80.0, "data_time": 0.0, "time": 0.1, "step": e})
    return write(tmp_path / "scalars.json", lines)


def test_epoch_based_run_is_detected_and_converted(tmp_path):
    path = epoch_run(tmp_path)
    with pytest.warns(RunLogWarning, match="epoch-based"):
        run = load_run(path)
    assert run.by_epoch and run.x == "epoch"
    assert run.metrics["step"].tolist() == [1, 2, 3]
    assert run.iters_per_epoch == 120
    with pytest.warns(RunLogWarning):
        it = load_run(path, x="iter")
    assert it.metrics["step"].tolist() == [120, 240, 360]
    assert it.metrics["epoch"].tolist() == [1, 2, 3]
    with pytest.warns(RunLogWarning):
        ep = load_run(path, x="epoch")
    np.testing.assert_allclose(ep.loss["step"], ep.loss["iter"] / 120)


def test_iteration_run_cannot_be_shown_in_epochs(tmp_path):
    path, _ = simple_run(tmp_path)
    with pytest.raises(SegrewardError, match="iteration-based"):
        load_run(path, x="epoch")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(SegrewardError, match="no such file"):
        load_run(tmp_path / "missing")
    with pytest.raises(SegrewardError, match="found no scalars.json"):
        load_run(tmp_path)
    (tmp_path / "scalars.json").write_text("\n\n")
    with pytest.raises(SegrewardError, match="holds no scalars"):
        load_run(tmp_path)


def test_clean_writes_csvs_readable_by_pandas(tmp_path):
    path, lines = simple_run(tmp_path)
    [(run, paths)] = clean_logs([path], tmp_path / "out")
    loss = pd.read_csv(tmp_path / "out" / "loss.csv")
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert [p.name for p in paths] == ["loss.csv", "metrics.csv"]
    assert loss["step"].tolist() == [d["step"] for d in lines if "loss" in d]
    np.testing.assert_allclose(loss["loss"], [d["loss"] for d in lines if "loss" in d])
    assert metrics[["step", "mIoU"]].values.tolist() == [[200, 20.0], [400, 40.0]]


def test_clean_several_runs_gives_one_folder_each(tmp_path):
    a, _ = simple_run(tmp_path, "a")
    b, _ = simple_run(tmp_path, "b")
    clean_logs([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert (tmp_path / "out" / "a" / "metrics.csv").exists()
    assert (tmp_path / "out" / "b" / "loss.csv").exists()


def test_writer_output_round_trips_through_the_reader(tmp_path):
    with RunWriter(tmp_path / "r") as w:
        w.log(10, {"lr": 0.1, "loss": 0.5, "reward_mean": 0.4})
        w.log(10, {"mIoU": 33.0, "aAcc": 80.0}, mode="val")
        w.log(20, {"lr": 0.1, "loss": float("nan"), "reward_mean": 0.45})
    run = load_run(tmp_path / "r")
    assert run.loss.columns.tolist() == ["step", "lr", "loss", "reward_mean", "iter"]
    assert run.loss["reward_mean"].tolist() == [0.4, 0.45] and math.isnan(run.loss["loss"][1])
    assert run.metrics.to_dict("list") == {"step": [10], "mIoU": [33.0], "aAcc": [80.0]}


def test_tensorboard_events_give_the_same_tables(tmp_path):
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "tb_run" / "20240101_000000" / "vis_data"
    w = SummaryWriter(str(run_dir))  # as mmengine's TensorboardVisBackend: plain tags
    for s in range(50, 401, 50):
        for k, v in {"lr": 0.01, "loss": 1.0 / s, "decode.acc_seg": s / 10, "time": 0.4}.items():
            w.add_scalar(k, v, s)
        if s % 200 == 0:
            w.add_scalar("mIoU", s / 20, s)
            w.add_scalar("aAcc", 80.0, s)
    w.close()
    run = load_run(tmp_path / "tb_run")
    assert find_sources(tmp_path / "tb_run")[0] == "tensorboard"
    assert set(run.loss.columns) == {"step", "lr", "loss", "decode.acc_seg", "time"}
    assert run.loss["step"].tolist() == list(range(50, 401, 50))
    np.testing.assert_allclose(run.loss["loss"], [1.0 / s for s in range(50, 401, 50)], rtol=1e-6)
    assert run.metrics.columns.tolist() == ["step", "mIoU", "aAcc"]
    assert run.metrics["mIoU"].tolist() == [10.0, 20.0]


def test_a_record_sharing_a_step_with_an_evaluation_never_hides_it(tmp_path):
    """A calibration line after the final evaluation (same step), and an extra-scalar line:
    each key keeps its last value, keys a line does not have survive."""
    lines = [train_line(100, 1.0), val_line(100, 50.0), train_line(150, 0.5), val_line(150, 57.35),
             {"calibration/reward_after": 0.58, "calibrated/mIoU": 58.0, "step": 150},
             {"extra": 3.0, "step": 100}]
    run = load_run(write(tmp_path / "r" / "scalars.json", lines))
    m = run.metrics.set_index("step")
    assert m.index.tolist() == [100, 150]
    assert m.loc[150, "mIoU"] == 57.35 and m.loc[150, "calibrated/mIoU"] == 58.0
    assert m.loc[100, "mIoU"] == 50.0 and m.loc[100, "extra"] == 3.0
    # A later line's own values still win (a resumed run logging the step again).
    run = load_run(write(tmp_path / "s" / "scalars.json", [val_line(150, 1.0), val_line(150, 2.0)]))
    assert run.metrics["mIoU"].tolist() == [2.0]


def test_a_calibrated_training_run_reads_back_its_final_evaluation(tmp_path):
    """A real trainer run with a ``calibrate:`` section: the last evaluation (same step as the
    calibration record) is in load_run, logs clean's metrics.csv, and logs plot's summary."""
    from segreward.cli import main
    from segreward.engine import config_from_dict, train

    dusk = {"type": "synthetic", "style": "dusk", "n": 4, "split": "val", "size": [32, 32]}
    work = tmp_path / "run"
    result = train(config_from_dict({
        "name": "t", "work_dir": str(work), "model": {"name": "unet", "options": {"width": 8}},
        "data": {"train": {"type": "synthetic", "style": "day", "n": 8, "size": [32, 32]}, "val": {"dusk": dusk}},
        "train": {"iters": 4, "batch_size": 4, "eval_every": 2, "progress": False},
        "calibrate": {"enabled": True, "data": "dusk", "kfold": 0}}))
    final = round(result["val"]["dusk"]["mIoU"], 4)
    run = load_run(work)
    assert run.metrics["step"].tolist() == [2, 4]
    assert run.metrics["mIoU"].iloc[-1] == pytest.approx(final)
    assert run.metrics["calibrated/mIoU"].iloc[-1] == pytest.approx(result["val_calibrated"]["dusk"]["mIoU"],
                                                                   abs=1e-4)
    assert main(["logs", "clean", str(work), "--out", str(tmp_path / "csv")]) == 0
    csv = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert csv["mIoU"].iloc[-1] == pytest.approx(final) and csv["step"].iloc[-1] == 4
    assert main(["logs", "plot", str(work), "--out", str(tmp_path / "p.png"), "--smoothing", "0"]) == 0
    summary = pd.read_csv(tmp_path / "p_summary.csv")
    assert summary["last_step"].iloc[0] == 4 and summary["last"].iloc[0] == pytest.approx(final)
