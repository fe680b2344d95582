"""benchmarks/calibrate.py at tiny sizes: every part runs and the JSON holds the numbers the docs
quote (the timings themselves are not checked: they belong to an idle machine)."""

import json

import pytest
import torch

# 1 thread: on a loaded machine two threads make every small op wait for the busy core (20x slower here).
TINY = ["--threads", "1", "--size", "32", "48", "--train-images", "4", "--train-steps", "1", "--width", "4",
        "--batch", "4", "--max-sweeps", "2", "--grid-points", "3", "--grid-max-sweeps", "1", "--reps", "1", "--flat-images", "1", "2",
        "--stream-images", "2", "--stream-size", "32", "64", "--stream-scale", "2", "--classes", "9",
        "--bins", "16"]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("calibrate")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_synthetic_run_writes_every_part(bench, tmp_path):
    out = tmp_path / "calibrate.json"
    logits = tmp_path / "logits.pt"
    result = bench.main(["--frames", "3", *TINY, "--save-logits", str(logits), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"source", "exact_vs_grid", "streaming_vs_exact", "large_streaming", "settings", "command", "machine",
            "runtime_s"} <= set(saved)
    assert {"torch", "threads", "cpus", "loadavg_before", "loadavg_after"} <= set(saved["machine"])

    p1 = saved["exact_vs_grid"]
    assert (p1["images"], p1["classes"]) == (3, 11)
    assert p1["exact"]["reward"] >= p1["exact"]["reward_before"] - 1e-12
    assert p1["grid"]["reward"] >= p1["exact"]["reward_before"] - 1e-12  # the grid never steps down either
    assert p1["grid"]["trace"][0][1] == pytest.approx(p1["exact"]["reward_before"])
    assert {"seconds", "sweeps", "reached_exact", "seconds_to_within"} <= set(p1["grid"])
    assert p1["grid_over_exact_time"] > 0 and set(p1["goals"]) >= {"exact_at_most_1s"}

    p2 = saved["streaming_vs_exact"]
    assert {"exact", "streaming", "reward_gap", "memory", "pass_cost", "memory_vs_images", "goals"} <= set(p2)
    assert set(p2["memory_vs_images"]) == {"1", "2"}
    assert all(v["streaming"]["cpu_mb"] > 0 and v["exact"]["cpu_mb"] > 0 for v in p2["memory_vs_images"].values())
    assert p2["pass_cost"]["streaming_over_eval"] > 0

    p3 = saved["large_streaming"]
    assert p3["label_size"] == [32, 64] and p3["input_size"] == [16, 32] and p3["classes"] == 9
    assert p3["pixels"] == 2 * 32 * 64
    assert "reward" in p3["exact"] and "reward_gap" in p3
    assert p3["streaming_over_eval"] > 0 and p3["memory_two_passes"]["cpu_mb"] > 0

    stored = torch.load(logits, weights_only=True)
    assert stored["logits"].shape == (3, 11, 32, 48) and stored["labels"].shape == (3, 32, 48)


def test_saved_logits_and_too_few_classes(bench, tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 16, 24), generator=g)
    logits = torch.randn(3, 4, 16, 24, generator=g) + 2 * torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2)
    torch.save({"logits": logits, "labels": labels}, tmp_path / "set.pt")
    result = bench.main(["--logits", str(tmp_path / "set.pt"), *TINY, "--exact-limit-gb", "0",
                         "--out", str(tmp_path / "r.json")])
    assert result["exact_vs_grid"]["pixels"] == 3 * 16 * 24 and result["exact_vs_grid"]["classes"] == 4
    assert "skipped" in result["large_streaming"]["exact"]
    with pytest.raises(SystemExit):
        bench.main(["--logits", "x.pt", "--camvid", "y"])
    with pytest.raises(SystemExit, match="at least 8 classes"):
        bench.depth_classes(5)


def test_depth_split_classes(bench):
    names, _ = bench.depth_classes(19)
    assert len(names) == len(set(names)) == 19 and names[:8] == list(bench.synthetic.CLASSES)
    scenes = bench.Scenes(2, "dusk", 19, (64, 128), progress=False)
    present = {names[k] for k in set(scenes.labels.ravel().tolist())}
    assert {"road_far1", "road_far2", "building_far1", "building_far2"} <= present  # every far bin is used
    x, y = bench.Scenes(1, "day", 11, (32, 64), scale=2, progress=False)[0]
    assert x.shape == (3, 16, 32) and y.shape == (32, 64) and int(y.max()) < 11
