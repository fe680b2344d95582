"""benchmarks/camvid_da.py end to end on a tiny generated CamVid-layout folder: every stage and
method runs through the trainer, --eval-root scores a test split, and the outputs carry the
seed-paired differences, per-class IoU, diagnostics and which frames were scored."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "camvid_da.py"
H, W = 32, 48
FIXTURE = {
    "train": ["0001TP_%06d" % f for f in range(6690, 6690 + 9 * 30, 30)]
    + ["0006R0_f%05d" % f for f in (930, 960, 990)] + ["0016E5_%05d" % f for f in (390, 420, 450)],
    "val": ["0016E5_%05d" % f for f in (405, 435)],
    "test": ["0001TP_%06d" % f for f in (8550, 8580, 8610)] + ["0016E5_%05d" % f for f in (7959, 7961)],
}


def make_camvid(root: Path) -> None:
    """Blocky label maps (ids 0..10, 11 = void) and images whose colour follows the label."""
    colours = np.random.default_rng(0).integers(0, 256, (12, 3))
    for split, names in FIXTURE.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for k, name in enumerate(names):
            rng = np.random.default_rng([("train", "val", "test").index(split), k])
            label = np.kron(rng.integers(0, 12, (H // 8, W // 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
            image = np.clip(colours[label] + rng.normal(0, 20, (H, W, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"{name}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"{name}.png")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("camvid_da", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_names_map_to_trainer_configs(bench):
    args = bench.parse(["--ce-anchor", "0.5"])
    assert bench.method_loss("ce", args, [])["loss"] == {"type": "ce"}
    local = bench.method_loss("local_running_ce", args, [])
    assert local["loss"] == {"type": "reinforce", "estimator": "local", "scope": "running", "k": 1, "momentum": 0.9,
                             "ce_weight": 0.5}
    assert not local["pseudo_label"]["enabled"]
    uda = bench.method_loss("local_pseudo_batch", args, [])
    assert uda["pseudo_label"]["enabled"] and uda["loss"]["scope"] == "batch"
    assert bench.method_loss("self_training", args, [])["loss"] == {"type": "ce"}
    sampled = bench.method_loss("reinforce_categorical_greedy_ce_kl", args, [])["loss"]
    assert sampled["baseline"] == "greedy" and sampled["ce_weight"] == 0.5 and sampled["kl_weight"] == 1.0
    assert bench.methods_of("uda", ["lovasz", "local_pseudo_batch"]) == ["self_training", "local_pseudo_batch"]
    assert bench.methods_of("after_ce", ["lovasz", "local_pseudo_batch"]) == ["ce", "lovasz"]
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "local_everywhere"])


def test_benchmark_end_to_end_with_a_test_split(bench, tmp_path):
    make_camvid(tmp_path / "camvid")
    out = tmp_path / "res" / "camvid_da"
    methods = ["ce", "lovasz", "reinforce_categorical_greedy_ce", "local_batch", "local_pseudo_batch"]
    args = bench.parse(["--root", str(tmp_path / "camvid"), "--eval-root", str(tmp_path / "camvid"),
                        "--seeds", "0", "1", "--size", str(H), str(W), "--width", "8", "--batch", "2",
                        "--pretrain-steps", "3", "--finetune-steps", "2", "--steps", "2", "--source-steps", "2",
                        "--uda-steps", "2", "--k", "2", "--threshold", "0.1", "--source-eval-every", "1",
                        "--work", str(tmp_path / "work"), "--out", str(out), "--methods", *methods])
    result = bench.run(args)

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] and saved["summary"] == json.loads(json.dumps(result["summary"]))
    rows = {(r["protocol"], r["method"]): r for r in saved["summary"]}
    assert set(rows) == {("after_ce", m) for m in ("ce_finetuned", "ce", "lovasz", "reinforce_categorical_greedy_ce",
                                                    "local_batch")} \
        | {("from_source", m) for m in ("source_only", "ce", "lovasz", "reinforce_categorical_greedy_ce",
                                        "local_batch")} \
        | {("uda", m) for m in ("source_only", "self_training", "local_pseudo_batch")}
    for key, row in rows.items():
        assert row["n"] == 2
        if key[1] in ("ce", "self_training"):
            assert "target_diff_mean" not in row
            continue
        assert row["reference"] == ("self_training" if key[0] == "uda" else "ce") and row["paired_seeds"] == [0, 1]
        ref = rows[(key[0], row["reference"])]
        runs = {(r["protocol"], r["method"], r["seed"]): r for r in saved["runs"]}
        diffs = [runs[(*key, s)]["target_mIoU"] - runs[(key[0], row["reference"], s)]["target_mIoU"] for s in (0, 1)]
        assert row["target_diff_mean"] == pytest.approx(np.mean(diffs), abs=1e-6)
        assert row["target_mean"] - ref["target_mean"] == pytest.approx(row["target_diff_mean"], abs=1e-6)
    # diagnostics come from the runs' logs
    assert "reward_mean" in rows[("after_ce", "local_batch")]["diag"]
    assert "reward_mean" in rows[("after_ce", "reinforce_categorical_greedy_ce")]["diag"]
    assert 0 < rows[("uda", "local_pseudo_batch")]["diag"]["pseudo_fraction"] <= 1
    assert all(len(r["target_IoU"]) == 11 for r in saved["runs"])
    # the scored frames: the test split's dusk frames, the day frames beside them
    assert saved["config"]["frames"]["target_eval"].startswith("3 frames of dusk 0001TP of")
    assert "/test` (--eval-root) (0001TP_008550..0001TP_008610)" in saved["config"]["frames"]["target_eval"]

    md = out.with_suffix(".md").read_text()
    assert "target evaluation (scored): 3 frames of dusk 0001TP of" in md and "/test` (--eval-root)" in md
    assert "last 1/3" not in md and "last third" not in md
    assert "source evaluation (scored): 2 frames of 0016E5 of" in md
    assert "| Δ target vs ce |" in md and "| Δ target vs self_training |" in md
    assert "Per-class target IoU" in md and "| lovasz | " in md and "Diagnostics" in md
    # method runs went through the trainer: run logs kept, weights dropped; shared stages kept
    assert (tmp_path / "work" / "seed0" / "after_ce" / "local_batch" / "vis_data" / "scalars.json").exists()
    assert not (tmp_path / "work" / "seed0" / "after_ce" / "local_batch" / "model.safetensors").exists()
    assert (tmp_path / "work" / "seed1" / "finetune" / "model.safetensors").exists()

    # --append with the same --work reuses the shared stages and skips the recorded runs
    args = bench.parse(args.argv + ["--append", "--seeds", "1", "2", "--protocols", "after_ce", "--methods", "ce"])
    bench.run(args)
    again = json.loads(out.with_suffix(".json").read_text())
    assert {r["seed"] for r in again["runs"] if r["method"] == "ce"} == {0, 1, 2}
    assert len(again["config"]["commands"]) == 2

    # --merge pools result files whose runs differ only in their seeds (parallel processes)
    other = tmp_path / "res" / "other"
    first = [a for a in args.argv if a not in ("--append",)]
    i = first.index("--out")
    first[i + 1] = str(other)
    bench.run(bench.parse(first + ["--seeds", "5", "--protocols", "after_ce", "--methods", "local_batch"]))
    merged = bench.merge([str(out), str(other)], str(tmp_path / "res" / "merged"))
    assert merged["config"]["seeds"] == [0, 1, 2, 5] and merged["config"]["processes"] == 2
    ce_row = next(r for r in merged["summary"] if r["protocol"] == "after_ce" and r["method"] == "local_batch")
    assert ce_row["n"] == 3 and ce_row["paired_seeds"] == [0, 1, 5]
    assert "the sum over 2 processes" in (tmp_path / "res" / "merged.md").read_text()
    with pytest.raises(SystemExit, match="only seeds may differ"):
        bench.run(bench.parse(first + ["--seeds", "6", "--protocols", "after_ce", "--methods", "ce", "--k", "3",
                                       "--out", str(tmp_path / "res" / "k3")]))
        bench.merge([str(out), str(tmp_path / "res" / "k3")], str(tmp_path / "res" / "bad"))
