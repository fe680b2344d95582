"""The README's main command, in its quick variant: every stage runs and the report is written."""

import json

from segreward.cli import main


def test_demo_quick_writes_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for stage in ("source only", "CE fine-tuned", "+ extra CE", "+ reward tuning", "+ calibration"):
        assert stage in out
    # Like for like only: calibrated vs calibrated, uncalibrated vs uncalibrated, calibration on the same model.
    assert "Reward tuning minus extra CE, both uncalibrated" in out
    assert "Reward tuning minus extra CE, both calibrated" in out
    assert "Calibration's own gain on + extra CE (same model)" in out
    assert "One seed (0): indicative only" in out and "--seeds 0 1 2" in out
    assert "minus extra CE (same budget, seed-paired)" not in out  # the old calibrated-vs-uncalibrated line
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["per_seed"]["0"]
    assert set(stages) == {"source_only", "ce_finetuned", "extra_ce", "reward_tuned", "ce_finetuned+cal",
                           "extra_ce+cal", "reward_tuned+cal"}
    assert (tmp_path / "seed0" / "reward_tuned" / "model_calibrated.safetensors").is_file()
    for stage in stages.values():
        assert 0 <= stage["target"]["mIoU"] <= 100 and 0 <= stage["source"]["mIoU"] <= 100
    for png in ("miou_curves.png", "examples.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "miou_curves.png" in report and "## What next" in report and "CPU-min" in report and "thread" in report
    # The report's "What next" evaluate command, as written, reproduces the table's number.
    import re
    import shlex
    command = re.search(r"`segreward (evaluate [^`]+)`", report).group(1)
    capsys.readouterr()
    assert main([*shlex.split(command), "--json", "--no-progress"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert abs(scores["mIoU"] - stages["reward_tuned+cal"]["target"]["mIoU"]) < 1e-6


def test_demo_method_option_and_bad_method(tmp_path, capsys):
    import torch
    before = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--seeds", "0", "1",
                     "--method", "reinforce_loo_ce", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "seed-paired" in out and "seeds [0, 1]" in out and "±" in out
    report = (tmp_path / "report.md").read_text()
    assert "--method reinforce_loo_ce" in report and "`reinforce_loo_ce`" in report and "--threads 1`" in report
    assert json.loads((tmp_path / "results.json").read_text())["threads"] == 1
    assert main(["demo", "--quick", "--out", str(tmp_path / "bad"), "--method", "nope"]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "local_batch_ce" in err
    assert main(["demo", "--quick", "--out", str(tmp_path / "bad"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_demo_methods_benchmark_compares_every_method_with_extra_ce(tmp_path, load_benchmark):
    bench = load_benchmark("demo_methods")
    result = bench.main(["--quick", "--seeds", "0", "1", "--methods", "local_batch_ce", "reinforce_loo_ce",
                         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res")])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ce_finetuned", "extra_ce", "local_batch_ce", "reinforce_loo_ce"}
    for m in ("local_batch_ce", "reinforce_loo_ce"):
        diffs = [result["per_seed"][s][m]["target"]["mIoU"] - result["per_seed"][s]["extra_ce"]["target"]["mIoU"]
                 for s in (0, 1)]
        assert rows[m]["target_diffs"] == [round(d, 3) for d in diffs]
    assert "| local_batch_ce |" in (tmp_path / "res.md").read_text()
