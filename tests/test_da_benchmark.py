"""benchmarks/da.py (pair camvid_dusk) end to end on a tiny generated CamVid-layout folder: every stage and
method runs through the trainer, --eval-root scores a test split, and the outputs carry the
seed-paired differences, per-class IoU, diagnostics and which frames were scored."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "da.py"
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
def bench(load_benchmark):
    return load_benchmark("da")


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
    assert bench.method_loss("ce_lovasz", args, [])["loss"] == {"type": "lovasz", "ce_weight": 1.0}
    sampled = bench.method_loss("reinforce_categorical_greedy_ce_kl", args, [])["loss"]
    assert sampled["baseline"] == "greedy" and sampled["ce_weight"] == 0.5 and sampled["kl_weight"] == 1.0
    assert bench.methods_of("uda", ["lovasz", "local_pseudo_batch"]) == ["self_training", "local_pseudo_batch"]
    assert bench.methods_of("after_ce", ["lovasz", "local_pseudo_batch"]) == ["ce", "lovasz"]
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "local_everywhere"])


def test_seeded_augmentation_does_not_depend_on_the_global_rng():
    """Per-sample seeded flips: the same (seed, index, draw) gives the same flip whatever the global
    RNG did before, and the global RNG is left untouched."""
    import torch
    from segreward.data import transforms as T
    from segreward.data.memory import InMemoryDataset
    ds = InMemoryDataset(torch.randn(5, 3, 4, 6), torch.randint(0, 3, (5, 4, 6)), ["a", "b", "c"])
    order = [0, 1, 2, 3, 4, 3, 1, 0, 2, 4] * 3

    def draws(consumed: int):
        torch.manual_seed(0)
        torch.rand(consumed)
        run = ds.seeded(7).with_transform(T.RandomFlip())  # the trainer's with_transform keeps the seed
        xs = [run[i][0] for i in order]
        return xs, torch.rand(1)

    a, after_a = draws(0)
    b, _ = draws(13)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(0)
    assert torch.equal(after_a, torch.rand(1))  # the augmentation drew nothing from the global RNG
    flipped = [not torch.equal(x, ds[i][0]) for x, i in zip(a, order)]
    assert any(flipped) and not all(flipped)
    assert not all(torch.equal(x, y) for x, y in zip(a, draws_with(ds, 8, order)))


def draws_with(ds, seed, order):
    from segreward.data import transforms as T
    run = ds.seeded(seed).with_transform(T.RandomFlip())
    return [run[i][0] for i in order]


def test_lr_choice_uses_the_mean_over_seeds_that_ran_the_grid(bench):
    def row(m, seed, lr, sel, tgt=None):
        return {"protocol": "after_ce", "method": m, "seed": seed, "lr": lr, "select_mIoU": sel,
                "target_mIoU": sel if tgt is None else tgt, "source_mIoU": 0.0, "target_IoU": [0.0] * 11, "diag": {}}
    runs = [row("ce", 0, 1e-3, 40), row("ce", 1, 1e-3, 30), row("ce", 0, 3e-4, 36), row("ce", 1, 3e-4, 36),
            row("ce", 2, 1e-3, 50),  # seed 2 ran one lr only: not part of the choice
            row("lovasz", 0, 1e-3, 37), row("lovasz", 1, 1e-3, 38),
            row("ce+cal", 0, 1e-3, 41), row("ce+cal", 1, 1e-3, 39), row("ce+cal", 0, 3e-4, 45), row("ce+cal", 1, 3e-4, 42)]
    summ = bench.summarize(runs)
    rows = {r["method"]: r for r in summ["rows"]}
    assert rows["ce"]["lr"] == 3e-4 and rows["ce"]["lr_chosen_on_seeds"] == [0, 1]  # 36 > 35 (not per seed)
    assert rows["ce+cal"]["lr"] == 3e-4
    d = rows["ce+cal"]["vs"]["ce"]
    assert d["ref_lr"] == 3e-4 and d["target_diffs"] == [9, 6] and d["target_diff_mean"] == pytest.approx(7.5)
    assert rows["ce"]["vs"]["lovasz"]["target_diffs"] == [-1, -2]
    (g,) = summ["goals"]
    assert g["best"] == "ce+cal" and not g["met_vs_lovasz"] and not g["met_vs_ce"]  # n=2 < 5
    # 95% interval of the paired differences [9, 6]: mean 7.5, sd 2.1213, t(0.975, 1) = 12.706
    assert d["target_ci95"] == pytest.approx([7.5 - 12.7062 * 1.5, 7.5 + 12.7062 * 1.5], abs=1e-3)
    # detectable effect: (t_0.975 + t_0.8) * sd / sqrt(n), t(0.8, 1) = 1.3764
    assert d["target_mde"] == pytest.approx((12.7062 + 1.3764) * 1.5, abs=1e-3)


def test_benchmark_end_to_end_with_a_test_split(bench, load_benchmark, tmp_path, capsys):
    make_camvid(tmp_path / "camvid")
    out = tmp_path / "res" / "camvid_da"
    methods = ["ce", "lovasz", "ce_lovasz", "local_batch", "local_pseudo_batch"]
    args = bench.parse(["--root", str(tmp_path / "camvid"), "--eval-root", str(tmp_path / "camvid"),
                        "--seeds", "0", "1", "--size", str(H), str(W), "--width", "8", "--batch", "2",
                        "--pretrain-steps", "3", "--finetune-steps", "2", "--steps", "2", "--source-steps", "2",
                        "--uda-steps", "2", "--lrs", "1e-3", "3e-3", "--source-lrs", "1e-3", "--uda-lrs", "1e-3",
                        "--threshold", "0.1", "--source-eval-every", "1", "--work", str(tmp_path / "work"),
                        "--out", str(out), "--methods", *methods, "--plot", str(tmp_path / "lr.png")])
    result = bench.run(args)

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] and saved["summary"] == json.loads(json.dumps(result["summary"]))
    trained = ("ce", "lovasz", "ce_lovasz", "local_batch")
    with_cal = lambda ms: {m for x in ms for m in (x, x + "+cal")}  # noqa: E731
    rows = {(r["protocol"], r["method"]): r for r in saved["summary"]["rows"]}
    assert set(rows) == {("after_ce", m) for m in with_cal(("ce_finetuned",) + trained)} \
        | {("from_source", m) for m in with_cal(("source_only",) + trained)} \
        | {("uda", m) for m in with_cal(("source_only", "self_training", "local_pseudo_batch"))}
    runs = {(r["protocol"], r["method"], r["seed"], r["lr"]): r for r in saved["runs"]}
    assert {lr for (p, m, s, lr) in runs if p == "after_ce" and m == "lovasz+cal"} == {1e-3, 3e-3}
    assert {lr for (p, m, s, lr) in runs if p == "from_source"} == {None, 1e-3}
    for key, row in rows.items():
        assert row["n"] == 2
        p, m = key
        by_seed = {s: runs[(p, m, s, row["lr"])] for s in (0, 1)}
        # the chosen lr has the best mean selection mIoU of the method's grid
        grid = {lr for (pp, mm, s, lr) in runs if (pp, mm) == key}
        sel = {lr: np.mean([runs[(p, m, s, lr)]["select_mIoU"] for s in (0, 1)]) for lr in grid}
        assert sel[row["lr"]] == max(sel.values())
        for ref in ("ce", "lovasz", "self_training"):
            if ref == m or (p, ref) not in rows:
                assert ref not in row["vs"]
                continue
            ref_lr = rows[(p, ref)]["lr"]
            diffs = [by_seed[s]["target_mIoU"] - runs[(p, ref, s, ref_lr)]["target_mIoU"] for s in (0, 1)]
            assert row["vs"][ref]["ref_lr"] == ref_lr
            assert row["vs"][ref]["target_diff_mean"] == pytest.approx(np.mean(diffs), abs=1e-6)
    # the selection split and the evaluation split are different frames here
    r0 = runs[("after_ce", "ce", 0, 1e-3)]
    assert set(r0) >= {"target_mIoU", "select_mIoU", "source_mIoU", "lr"}
    # +cal: offsets fitted on the tune frames, the in-sample mIoU does not drop
    cal = runs[("after_ce", "ce+cal", 0, 1e-3)]
    assert cal["diag"]["cal_tune_after"] >= cal["diag"]["cal_tune_before"] - 1e-6 and len(cal["diag"]["offsets"]) == 11
    # diagnostics come from the runs' logs; ce_lovasz trains Lovász + CE
    assert "reward_mean" in rows[("after_ce", "local_batch")]["diag"]
    assert {"part_lovasz", "part_ce"} <= set(rows[("after_ce", "ce_lovasz")]["diag"])
    assert "part_ce" not in rows[("after_ce", "lovasz")]["diag"]
    assert 0 < rows[("uda", "local_pseudo_batch")]["diag"]["pseudo_fraction"] <= 1
    assert all(len(r["target_IoU"]) == 11 for r in saved["runs"])
    assert [(g["protocol"], g["met"]) for g in saved["summary"]["goals"]] == [("after_ce", False)]  # n = 2
    # the scored frames: the test split's dusk frames, the day frames beside them
    fr = saved["config"]["frames"]
    assert fr["target_eval"].startswith("3 frames of dusk 0001TP of")
    assert "/test` (--eval-root) (0001TP_008550..0001TP_008610)" in fr["target_eval"]
    assert fr["target_select"].startswith("3 frames of dusk 0001TP of") and "last 1/3" in fr["target_select"]
    assert (tmp_path / "lr.png").stat().st_size > 0

    md = out.with_suffix(".md").read_text()
    assert "target evaluation (scored, no choice made on it): 3 frames of dusk 0001TP of" in md and "/test` (--eval-root)" in md
    assert "optimistic" not in md
    assert "source evaluation (scored): 2 frames of 0016E5 of" in md
    assert "| Δ vs ce [95%] | detectable | Δ vs lovasz [95%] | detectable |" in md
    assert "| Δ vs self_training [95%] | detectable |" in md
    assert "lr curves" in md and "Per-class target IoU" in md and "| lovasz+cal | " in md and "Diagnostics" in md
    assert "## Goal" in md
    # method runs went through the trainer: run logs kept, weights dropped; shared stages kept
    assert (tmp_path / "work" / "seed0" / "N6" / "after_ce" / "local_batch" / "lr0.001" / "vis_data" / "scalars.json").exists()
    assert not (tmp_path / "work" / "seed0" / "N6" / "after_ce" / "local_batch" / "lr0.001" / "model.safetensors").exists()
    assert (tmp_path / "work" / "seed1" / "N6" / "finetune" / "model.safetensors").exists()

    # --append with the same --work reuses the shared stages and skips the recorded runs; a stage
    # trained under other CPU vector instructions (its marker says so) is another model: retrained
    import torch
    marker = tmp_path / "work" / "seed2" / "pretrain" / "benchmark_stage.json"
    kept = tmp_path / "work" / "seed1" / "pretrain" / "model.safetensors"
    kept_time = kept.stat().st_mtime_ns
    args2 = bench.parse(args.argv + ["--append", "--seeds", "1", "2", "--protocols", "after_ce", "--methods", "ce"])
    bench.run(args2)
    assert kept.stat().st_mtime_ns == kept_time  # reused
    key = json.loads(marker.read_text())["key"]
    assert key["cpu"] == torch.backends.cpu.get_cpu_capability()
    marker.write_text(json.dumps({"key": {**key, "cpu": "another"}}))
    stale = marker.with_name("model.safetensors").stat().st_mtime_ns
    bench.run(bench.parse(args.argv + ["--append", "--seeds", "2", "--protocols", "after_ce", "--methods", "ce"]))
    assert marker.with_name("model.safetensors").stat().st_mtime_ns != stale
    # ... and the CE fine-tune built on the old start is trained again from the new one
    tuned = json.loads((tmp_path / "work" / "seed2" / "N6" / "finetune" / "benchmark_stage.json").read_text())
    assert tuned["key"]["start_sha256"] == hashlib.sha256(marker.with_name("model.safetensors").read_bytes()).hexdigest()
    assert json.loads(marker.read_text())["key"]["cpu"] == key["cpu"]
    again = json.loads(out.with_suffix(".json").read_text())
    assert {r["seed"] for r in again["runs"] if r["method"] == "ce"} == {0, 1, 2}
    assert len(again["config"]["commands"]) == 3
    assert len([r for r in again["runs"] if (r["protocol"], r["method"], r["seed"]) == ("after_ce", "ce", 1)]) == 2

    # --lrs-from runs each method at its chosen lrs only; --merge pools the files
    other = tmp_path / "res" / "other"
    first = [a for a in args.argv if a not in ("--append",)]
    first[first.index("--out") + 1] = str(other)
    bench.run(bench.parse(first + ["--seeds", "5", "--protocols", "after_ce", "--methods", "lovasz",
                                   "--lrs-from", str(out)]))
    five = json.loads(other.with_suffix(".json").read_text())["runs"]
    chosen = {rows[("after_ce", m)]["lr"] for m in ("lovasz", "lovasz+cal")}
    assert {r["lr"] for r in five if r["method"] == "lovasz"} == chosen
    merged = bench.merge([str(out), str(other)], str(tmp_path / "res" / "merged"))
    assert merged["config"]["seeds"] == [0, 1, 2, 5] and merged["config"]["processes"] == 2
    lz = next(r for r in merged["summary"]["rows"] if r["protocol"] == "after_ce" and r["method"] == "lovasz")
    assert lz["lr_chosen_on_seeds"] == ([0, 1, 5] if len(chosen) == 2 else [0, 1])  # seed 5: both lrs or one
    assert "the sum over 2 processes" in (tmp_path / "res" / "merged.md").read_text()
    # --skip-runs-in: a grid extended over an earlier file runs only what that file lacks
    ext = tmp_path / "res" / "extended"
    bench.run(bench.parse(first + ["--seeds", "5", "--protocols", "after_ce", "--methods", "lovasz",
                                   "--lrs", "1e-3", "3e-3", "1e-4", "--skip-runs-in", str(other), "--out", str(ext)]))
    new = {(r["method"], r["lr"]) for r in json.loads(ext.with_suffix(".json").read_text())["runs"]}
    had = {(r["method"], r["lr"]) for r in five}
    grid = {(m + c, lr) for m in ("ce", "lovasz") for c in ("", "+cal") for lr in (1e-3, 3e-3, 1e-4)}
    assert new.isdisjoint(had) and new | (had - {("ce_finetuned", None), ("ce_finetuned+cal", None)}) == grid
    assert ("lovasz", 1e-4) in new and ("ce_finetuned", None) not in new
    pooled = bench.merge([str(out), str(other), str(ext)], str(tmp_path / "res" / "pooled"))["runs"]
    assert {(r["method"], r["lr"]) for r in pooled if r["seed"] == 5} == grid | {("ce_finetuned", None), ("ce_finetuned+cal", None)}
    with pytest.raises(SystemExit, match=r"--skip-runs-in .*lr\.json: not a result file of benchmarks/da\.py"):
        bench.run(bench.parse(first + ["--seeds", "5", "--skip-runs-in", str(tmp_path / "lr.png")]))
    broken = tmp_path / "res" / "broken.json"
    broken.write_text("{not json")  # an --out file that --append cannot read is named, and left as it was
    with pytest.raises(SystemExit, match=r"--append --out .*broken\.json: not a result file"):
        bench.run(bench.parse(first + ["--seeds", "5", "--append", "--out", str(broken.with_suffix(""))]))
    assert broken.read_text() == "{not json"
    # the README's compact tables come from the file: means, paired Δ and calibration's own effect
    tables = load_benchmark("verdict_tables")
    first_run = tmp_path / "res" / "first.json"  # the file as the first run wrote it (before --append)
    first_run.write_text(json.dumps(saved))
    capsys.readouterr()
    tables.main([str(first_run), "--protocol", "after_ce"])
    text = capsys.readouterr().out
    assert text.startswith("### after_ce, budget ") and "| method (chosen lr; with cal) |" in text
    lz = rows[("after_ce", "lovasz")]
    assert f"| 2 | {lz['target_mean']:.2f} ± {lz['target_std']:.2f} |".replace("-", "\u2212") in text
    cal_lr = rows[("after_ce", "ce+cal")]["lr"]
    own = np.mean([runs[("after_ce", "ce+cal", s, cal_lr)]["target_mIoU"] - runs[("after_ce", "ce", s, cal_lr)]["target_mIoU"]
                   for s in (0, 1)])
    assert f"extra CE {own:+.2f} [".replace("-", "\u2212") in text
    assert "from_source" not in text and "**not met**" in text
    with pytest.raises(SystemExit, match="not a result file"):
        tables.main([str(tmp_path / "lr.png")])
    with pytest.raises(SystemExit, match="only seeds"):
        bench.run(bench.parse(first + ["--seeds", "6", "--protocols", "after_ce", "--methods", "ce", "--k", "3",
                                       "--lrs", "1e-3", "--out", str(tmp_path / "res" / "k3")]))
        bench.merge([str(out), str(tmp_path / "res" / "k3")], str(tmp_path / "res" / "bad"))


def test_benchmark_without_a_test_split_scores_the_selection_split(bench, tmp_path):
    make_camvid(tmp_path / "camvid")
    for folder in ("test", "testannot"):  # a copy without the official test split
        shutil.rmtree(tmp_path / "camvid" / folder)
    out = tmp_path / "res" / "sel"
    bench.run(bench.parse(["--root", str(tmp_path / "camvid"), "--seeds", "0", "--size", str(H), str(W),
                           "--width", "8", "--batch", "2", "--pretrain-steps", "2", "--finetune-steps", "1",
                           "--steps", "1", "--lrs", "1e-3", "--protocols", "after_ce", "--methods", "ce",
                           "--source-eval-every", "1", "--out", str(out)]))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert all(r["target_mIoU"] == r["select_mIoU"] for r in saved["runs"])
    assert {r["method"] for r in saved["runs"]} == {"ce_finetuned", "ce_finetuned+cal", "ce", "ce+cal"}
    assert "optimistic" in saved["config"]["frames"]["target_eval"]
    md = out.with_suffix(".md").read_text()
    assert "chosen on it: optimistic" in md and "No test split here" in md


def test_same_command_same_seed_same_numbers(tmp_path):
    """Two processes running the same command (seed, threads) record identical scores, in every
    protocol: stages, batches, flips, sampling (local estimator) and evaluation are all seeded.
    The second runs with malloc as it is (SEGREWARD_MALLOC=default): the allocator setting
    changes where memory comes from, never a number."""
    import os
    import subprocess
    import sys
    make_camvid(tmp_path / "camvid")
    outs, mallocs = [], []
    for k in range(2):
        env = {**os.environ, "SEGREWARD_MALLOC": "keep-freed" if k == 0 else "default"}
        out = tmp_path / f"run{k}"
        subprocess.run([sys.executable, str(BENCH), "--root", str(tmp_path / "camvid"), "--seeds", "3",
                        "--size", str(H), str(W), "--width", "8", "--batch", "2", "--pretrain-steps", "4",
                        "--finetune-steps", "3", "--steps", "3", "--source-steps", "2", "--uda-steps", "2",
                        "--lrs", "1e-3", "--threshold", "0.1", "--source-eval-every", "1", "--threads", "1",
                        "--methods", "ce", "local_batch_ce", "lovasz", "local_pseudo_batch", "--out", str(out)],
                       check=True, capture_output=True, env=env)
        saved = json.loads(out.with_suffix(".json").read_text())
        runs = saved["runs"]
        mallocs.append(saved["config"]["machine"]["malloc"])
        outs.append({(r["protocol"], r["method"], r["lr"]): {k: v for k, v in r.items() if k != "time_s"}
                     for r in runs})
    assert mallocs == (["keep-freed", "default"] if sys.platform.startswith("linux") else ["default", "default"])
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 22
    for key in outs[0]:
        assert outs[0][key] == outs[1][key], key


def test_camvid_idd_semi_supervised_protocol(bench, load_benchmark, tmp_path, capsys):
    """Pair camvid_idd end to end, with the semi protocol: the tune labels plus the pool's frames
    without labels (the tune frames left out of those), from the CE fine-tuned start; its rows are
    paired with after_ce's extra CE and Lovász of the same seed (same start), and the goal of the
    semi pipelines is judged against those."""
    from test_idd_lite import make_idd
    make_camvid(tmp_path / "camvid")
    make_idd(tmp_path / "idd", {str(s): 3 for s in range(8)}, test=3)
    out = tmp_path / "res" / "idd"
    argv = ["--pair", "camvid_idd", "--root", str(tmp_path / "camvid"), "--idd-root", str(tmp_path / "idd"),
            "--budget", "2", "--eval-frames", "4", "--select-frames", "4", "--seeds", "0", "1",
            "--size", str(H), str(W), "--width", "8", "--batch", "2", "--pretrain-steps", "2",
            "--finetune-steps", "2", "--steps", "2", "--semi-steps", "2", "--lrs", "1e-3", "--threshold", "0.1",
            "--source-eval-every", "1", "--protocols", "after_ce", "semi", "--methods", "ce", "lovasz",
            "local_batch_ce", "--work", str(tmp_path / "work"), "--out", str(out)]
    bench.run(bench.parse(argv))
    saved = json.loads(out.with_suffix(".json").read_text())
    # 4 pool sequences x 3 frames, 2 of them the tune frames, + 3 unlabelled test frames: 13 without
    # labels; the 2 labelled frames repeated round(13 / 2) = 6 times make up about half
    assert saved["config"]["frames"]["target_semi"].startswith("the 2 tune frames (labels kept) x 6 + 13 target")
    runs = {(r["protocol"], r["method"], r["seed"]): r for r in saved["runs"]}
    assert {m for p, m, _ in runs if p == "semi"} == {"ce", "ce+cal", "lovasz", "lovasz+cal", "local_batch_ce",
                                                      "local_batch_ce+cal"}
    assert runs[("semi", "ce", 0)]["target_mIoU"] != runs[("after_ce", "ce", 0)]["target_mIoU"]
    assert runs[("semi", "local_batch_ce", 0)]["diag"]["pseudo_fraction"] > 0
    rows = {(r["protocol"], r["method"]): r for r in saved["summary"]["rows"]}
    semi = rows[("semi", "local_batch_ce+cal")]
    assert set(semi["vs"]) == {"ce", "lovasz", "after_ce:ce", "after_ce:lovasz", "ce+cal", "lovasz+cal",
                               "after_ce:ce+cal", "after_ce:lovasz+cal", "after_ce:local_batch_ce+cal"}
    same = [runs[("semi", "local_batch_ce+cal", s)]["target_mIoU"]
            - runs[("after_ce", "local_batch_ce+cal", s)]["target_mIoU"] for s in (0, 1)]
    assert semi["vs"]["after_ce:local_batch_ce+cal"]["target_diffs"] == [round(v, 3) for v in same]
    want = [runs[("semi", "local_batch_ce+cal", s)]["target_mIoU"] - runs[("after_ce", "ce", s)]["target_mIoU"]
            for s in (0, 1)]
    assert semi["vs"]["after_ce:ce"]["target_diffs"] == [round(v, 3) for v in want]
    assert "after_ce:ce" not in rows[("after_ce", "lovasz")]["vs"]
    goals = {g["protocol"]: g for g in saved["summary"]["goals"]}
    g = goals["semi"]
    best = rows[("semi", g["best"])]
    assert g["vs_ce"]["mean"] == pytest.approx(best["vs"]["after_ce:ce"]["target_diff_mean"])
    assert g["vs_semi_ce"] is not None and not g["met"]  # n = 2
    assert "- semi, budget 2: criterion" in out.with_suffix(".md").read_text()
    tables = load_benchmark("verdict_tables")
    capsys.readouterr()
    tables.main([str(out), "--protocol", "semi"])
    text = capsys.readouterr().out
    assert text.startswith("### semi, budget 2") and "Δ vs extra CE (labels alone) [95%]" in text
    assert "Δ vs the same method on the labels alone [95%]" in text
    assert "vs the same budget of CE on labels + pseudo-labels" in text
    # a file written before the semi options existed merges with one that has them (first or not)
    old = json.loads(json.dumps(saved))
    old["runs"] = [r for r in old["runs"] if r["protocol"] == "after_ce"]
    for k in ("semi_steps", "semi_lrs", "semi_labelled"):
        del old["config"][k]
    del old["config"]["frames"]["target_semi"]
    (tmp_path / "res" / "old.json").write_text(json.dumps(old))
    merged = bench.merge([str(tmp_path / "res" / "old"), str(out)], str(tmp_path / "res" / "merged"))
    assert merged["config"]["semi_steps"] == 2 and "target_semi" in merged["config"]["frames"]
    assert merged["summary"]["rows"] == saved["summary"]["rows"]
    with pytest.raises(SystemExit, match=r"settings differ .* \['semi_labelled'\]"):
        saved["config"]["semi_labelled"] = 0.25
        (tmp_path / "res" / "other.json").write_text(json.dumps(saved))
        bench.merge([str(out), str(tmp_path / "res" / "other")], str(tmp_path / "res" / "bad"))
    saved["config"]["semi_labelled"] = 0.5
    saved["config"]["machine"]["cpu_capability"] = "another"
    (tmp_path / "res" / "other.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="different machines"):
        bench.merge([str(out), str(tmp_path / "res" / "other")], str(tmp_path / "res" / "bad"))
    before = out.with_suffix(".json").read_bytes()
    with pytest.raises(SystemExit, match="is one of the files to merge; it is left as it is"):
        bench.merge([str(out), str(tmp_path / "res" / "old")], str(out))
    assert out.with_suffix(".json").read_bytes() == before
    # a run both files hold with other scores (another machine's model of that seed): refused
    del saved["config"]["machine"]["cpu_capability"]  # e.g. a file written before it was recorded
    start = next(r for r in saved["runs"] if r["method"] == "ce_finetuned" and r["seed"] == 1)
    start["target_mIoU"] += 0.5
    (tmp_path / "res" / "other.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"idd and .*other both hold .*'ce_finetuned', 1, None\) with other scores"):
        bench.merge([str(out), str(tmp_path / "res" / "other")], str(tmp_path / "res" / "bad"))
    with pytest.raises(SystemExit, match="no target frames without labels beyond the tune frames"):
        bench.run(bench.parse(["--root", str(tmp_path / "camvid"), "--seeds", "0", "--size", str(H), str(W),
                               "--protocols", "semi", "--methods", "ce", "--out", str(tmp_path / "res" / "dusk")]))
    with pytest.raises(SystemExit):
        bench.parse(argv + ["--semi-labelled", "1"])
