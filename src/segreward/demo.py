"""``segreward demo``: the whole idea on a laptop, on embedded synthetic data (no download).

1. *source only*: pretrain the built-in U-Net with cross-entropy on the synthetic **day** domain;
2. *CE fine-tuned*: fine-tune with cross-entropy on a few labelled **dusk** images (the target),
   with as many source images replayed (so the source domain is not forgotten);
3. from that checkpoint, spend the same extra budget two ways:
   (a) *+ extra CE* -- more cross-entropy on the same dusk images;
   (b) *+ reward tuning* -- :class:`~segreward.ReinforceLoss` with one of :data:`METHODS`
       (default :data:`DEFAULT_METHOD`, the best measured one; ``--method`` picks another);
4. *+ calibration* after stages 2 and 3: one logit offset per class fitted exactly on the
   dataset-level mIoU of the labelled dusk images and folded into the weights (the trainer's
   ``calibrate`` step; no training);
5. evaluate every stage on held-out dusk images (target) and day images (source, forgetting),
   and write a report (markdown table, mIoU-vs-step plot, example predictions).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from segreward.engine import config_from_dict, train

STAGES = ("source_only", "ce_finetuned", "extra_ce", "reward_tuned")

# Reward-tuning methods of the last stage: the trainer's loss section, and how the report names it.
METHODS = {
    "local_batch_ce": ({"type": "reinforce", "estimator": "local", "scope": "batch", "ce_weight": 0.5},
                       "exact per-pixel credit, mIoU of the batch, CE anchor 0.5"),
    "local_batch": ({"type": "reinforce", "estimator": "local", "scope": "batch"},
                    "exact per-pixel credit, mIoU of the batch"),
    "local_running_ce": ({"type": "reinforce", "estimator": "local", "scope": "running", "ce_weight": 0.5},
                         "exact per-pixel credit, mIoU of batch + past batches, CE anchor 0.5"),
    "local_image_ce": ({"type": "reinforce", "estimator": "local", "scope": "image", "ce_weight": 0.5},
                       "exact per-pixel credit, per-image mIoU, CE anchor 0.5"),
    "reinforce_loo_ce": ({"type": "reinforce", "estimator": "sample", "k": 4, "baseline": "loo", "ce_weight": 0.5},
                         "REINFORCE, per-image mIoU, K=4, loo, CE anchor 0.5"),
}
DEFAULT_METHOD = "local_batch_ce"
# Rows of the report: the stages, and the calibrated stages (``<stage>+cal``, no run folder of their own).
CALIBRATED = ("ce_finetuned", "extra_ce", "reward_tuned")
ROWS = (*STAGES, *(f"{st}+cal" for st in CALIBRATED))
LABELS = {"source_only": "source only", "ce_finetuned": "CE fine-tuned", "extra_ce": "+ extra CE",
          "reward_tuned": "+ reward tuning", "ce_finetuned+cal": "CE fine-tuned + calibration",
          "extra_ce+cal": "+ extra CE + calibration", "reward_tuned+cal": "+ reward tuning + calibration"}


@dataclass
class DemoSettings:
    size: tuple[int, int] = (64, 128)
    n_source: int = 256
    n_target_labelled: int = 32
    n_eval: int = 64
    n_replay: int = 32  # source images mixed into every target stage, against forgetting
    pretrain_iters: int = 400
    finetune_iters: int = 150
    extra_iters: int = 150
    batch_size: int = 8
    width: int = 16
    method: str = DEFAULT_METHOD  # reward tuning: a key of METHODS
    tune_lr: float = 3e-4

    def __post_init__(self):
        if self.method not in METHODS:
            from segreward.errors import SegrewardError
            raise SegrewardError(f"unknown demo method {self.method!r}; valid: {', '.join(METHODS)}")

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        return cls(size=(32, 64), n_source=32, n_target_labelled=8, n_eval=8, n_replay=8, pretrain_iters=12,
                   finetune_iters=6, extra_iters=6, batch_size=4, width=8, **kw)


def _data(s: DemoSettings, seed: int) -> dict:
    size = list(s.size)
    target_eval = {"type": "synthetic", "style": "dusk", "n": s.n_eval, "seed": seed, "size": size, "split": "val"}
    source_eval = {"type": "synthetic", "style": "day", "n": s.n_eval, "seed": seed, "size": size, "split": "val"}
    return {
        "source": {"type": "synthetic", "style": "day", "n": s.n_source, "seed": seed, "size": size},
        "target": {"type": "concat", "parts": [
            {"type": "synthetic", "style": "dusk", "n": s.n_target_labelled, "seed": seed, "size": size},
            {"type": "synthetic", "style": "day", "n": s.n_replay, "seed": seed, "size": size}]},
        "val": {"target": target_eval, "source": source_eval},
    }


def _calibration(s: DemoSettings, seed: int) -> dict:
    """The trainer's calibrate step, fitted on the labelled dusk images (not the replayed day ones)."""
    return {"enabled": True, "data": _data(s, seed)["target"]["parts"][0], "mode": "exact", "kfold": 0}


def _stage_config(name: str, work: Path, s: DemoSettings, seed: int, train_data: dict, iters: int, *,
                  stage: str, checkpoint: Path | None, loss: dict, lr: float, schedule: str, progress: bool,
                  calibrate: dict | None = None) -> dict:
    return {
        "calibrate": calibrate or {},
        "name": name, "stage": stage, "seed": seed, "work_dir": str(work / name),
        "data": {"train": train_data, "val": _data(s, seed)["val"]},
        "model": {"name": "unet", "options": {"width": s.width}, "checkpoint": str(checkpoint) if checkpoint else None},
        "loss": loss,
        "optim": {"name": "adamw" if stage == "pretrain" else "adam", "lr": lr, "schedule": schedule,
                  "weight_decay": 1e-4 if stage == "pretrain" else 0.0},
        "train": {"iters": iters, "batch_size": s.batch_size, "eval_every": max(1, iters // 5),
                  "checkpoint_every": iters, "log_every": max(1, iters // 20), "progress": progress},
    }


def _scores(val: dict) -> dict:
    return {dom: {"mIoU": v["mIoU"], "aAcc": v["aAcc"], "mAcc": v["mAcc"], "IoU": v["IoU"]} for dom, v in val.items()}


def _record(results: dict, stage: str, run: dict) -> None:
    """A stage's scores, and its calibrated scores when the run calibrated."""
    results[stage] = _scores(run["val"])
    if "val_calibrated" in run:
        results[f"{stage}+cal"] = _scores(run["val_calibrated"])


def run_reward_stage(work: Path, s: DemoSettings, seed: int, method: str, name: str = "reward_tuned",
                     progress: bool = True, calibrate: bool = False) -> dict:
    """The last stage with one of :data:`METHODS`, from the seed's CE fine-tuned checkpoint
    (written by :func:`run_seed`); returns ``{name: {"target": scores, "source": scores}}``, plus
    ``{name}+cal`` with ``calibrate``."""
    data = _data(s, seed)
    rl = train(config_from_dict(_stage_config(
        name, work, s, seed, data["target"], s.extra_iters, stage="tune",
        checkpoint=work / "ce_finetuned" / "model.safetensors", loss=dict(METHODS[method][0]), lr=s.tune_lr,
        schedule="constant", progress=progress, calibrate=_calibration(s, seed) if calibrate else None)),
        overwrite=True)
    out: dict = {}
    _record(out, name, rl)
    return out


def run_seed(work: Path, s: DemoSettings, seed: int, progress: bool = True, with_reward: bool = True,
             calibrate: bool = True) -> dict:
    """The four stages for one seed (the last one only if ``with_reward``); returns
    ``{stage: {"target": scores, "source": scores}}``, and ``{stage}+cal`` for the calibrated
    stages with ``calibrate``. The demo's own stage folders are replaced (``overwrite=True``):
    running the demo again just works."""
    cal = _calibration(s, seed) if calibrate else None
    data = _data(s, seed)
    results = {}
    pre = train(config_from_dict(_stage_config(
        "source_only", work, s, seed, data["source"], s.pretrain_iters, stage="pretrain", checkpoint=None,
        loss={"type": "ce"}, lr=3e-3, schedule="poly", progress=progress)), overwrite=True)
    results["source_only"] = _scores(pre["val"])
    ft = train(config_from_dict(_stage_config(
        "ce_finetuned", work, s, seed, data["target"], s.finetune_iters, stage="tune",
        checkpoint=work / "source_only" / "model.safetensors", loss={"type": "ce"}, lr=1e-3, schedule="poly",
        progress=progress, calibrate=cal)), overwrite=True)
    _record(results, "ce_finetuned", ft)
    extra = train(config_from_dict(_stage_config(
        "extra_ce", work, s, seed, data["target"], s.extra_iters, stage="tune",
        checkpoint=work / "ce_finetuned" / "model.safetensors", loss={"type": "ce"}, lr=s.tune_lr,
        schedule="constant", progress=progress, calibrate=cal)), overwrite=True)
    _record(results, "extra_ce", extra)
    if with_reward:
        results.update(run_reward_stage(work, s, seed, s.method, progress=progress, calibrate=calibrate))
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    m, sd = _mean_std(values)
    return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"


def summary_table(per_seed: dict[int, dict]) -> str:
    """Each stage uncalibrated and calibrated side by side (mean ± std over seeds), then
    like-for-like differences only: calibrated vs calibrated, uncalibrated vs uncalibrated, and
    calibration's own gain on the same model."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    lines = ["| stage | target mIoU (dusk) | + calibration | source mIoU (day) | + calibration |",
             "| --- | --- | --- | --- | --- |"]
    for stage in (st for st in STAGES if st in first):
        cells = []
        for dom in ("target", "source"):
            cells.append(_cell([per_seed[sd][stage][dom]["mIoU"] for sd in seeds]))
            cal = f"{stage}+cal"
            cells.append(_cell([per_seed[sd][cal][dom]["mIoU"] for sd in seeds]) if cal in first else "–")
        lines.append(f"| {LABELS[stage]} | {' | '.join(cells)} |")
    lines.append("")
    if len(seeds) > 1:
        lines.append(f"Mean ± std over seeds {seeds}. Differences below are seed-paired (one value per seed in "
                     "brackets).")
    else:
        lines.append(f"One seed ({seeds[0]}): indicative only; a difference of this size can change sign with "
                     "another seed (`--seeds 0 1 2` gives mean ± std).")
    lines.append("")
    for row, base, what in comparisons(first):
        for dom in ("target", "source"):
            gains = [per_seed[sd][row][dom]["mIoU"] - per_seed[sd][base][dom]["mIoU"] for sd in seeds]
            m, sd_ = _mean_std(gains)
            per = ", ".join(f"{g:+.2f}" for g in gains)
            lines.append(f"- {what}, {dom} mIoU: {m:+.2f}" + (f" ± {sd_:.2f} ({per})" if len(seeds) > 1 else ""))
    return "\n".join(lines)


def comparisons(stages) -> list[tuple[str, str, str]]:
    """``(row, baseline row, words)`` of the like-for-like differences the report shows, for the
    rows present in ``stages``."""
    pairs = [("reward_tuned", "extra_ce", "Reward tuning minus extra CE, both uncalibrated (same budget)"),
             ("reward_tuned+cal", "extra_ce+cal", "Reward tuning minus extra CE, both calibrated (same budget)")]
    pairs += [(f"{st}+cal", st, f"Calibration's own gain on {LABELS[st]} (same model)") for st in CALIBRATED]
    return [(row, base, what) for row, base, what in pairs if row in stages and base in stages]


def next_steps(out: Path, seed: int, seeds_run: int, method: str, heldout: Path, labelled: Path) -> str:
    """What a user can do next, with the paths this run wrote (``heldout``, ``labelled``: the
    dataset specs of the seed's held-out and labelled dusk images)."""
    run = out / f"seed{seed}"
    more = "" if seeds_run > 1 else ("- Run more seeds before trusting a difference: "
                                     f"`segreward demo --seeds 0 1 2 --out {out}` (about 3x the time).\n")
    return (f"## What next\n\n"
            f"- The weights: `{run}/<stage>/model.safetensors`, calibrated: "
            f"`{run}/<stage>/model_calibrated.safetensors` (`offsets.json` beside them names the data the "
            f"offsets were fitted on).\n"
            f"- Score one on the held-out dusk images: `segreward evaluate {run}/reward_tuned/model_calibrated.safetensors "
            f"{heldout}`; calibrate a stage yourself: `segreward calibrate {run}/extra_ce {labelled} --out "
            f"{out}/my_calibration`.\n"
            f"- Calibrate your own model on your labelled images (a dataset spec as in "
            f"`configs/data/folder_example.yaml` of the repository): `segreward calibrate runs/my_run my_labelled.yaml`, "
            f"then `segreward evaluate runs/my_run/calibrated/model.safetensors my_heldout.yaml` on images it was not "
            f"fitted on.\n" + more
            + (f"- Another reward-tuning method: `segreward demo --method NAME` (one of {', '.join(METHODS)}; "
               f"this run: `{method}`).\n"))


def _plot_curves(work: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segreward.runlog import load_run

    offsets = {"source_only": 0}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    colours = {"source_only": "tab:gray", "ce_finetuned": "tab:blue", "extra_ce": "tab:orange", "reward_tuned": "tab:green"}
    cfgs = {st: json.loads((work / st / "summary.json").read_text())["step"] for st in STAGES}
    offsets["ce_finetuned"] = cfgs["source_only"]
    offsets["extra_ce"] = offsets["reward_tuned"] = cfgs["source_only"] + cfgs["ce_finetuned"]
    for stage in STAGES:
        run = load_run(work / stage)
        m = run.metrics
        for ax, key, title in ((axes[0], "mIoU", "target (dusk, held out)"), (axes[1], "source/mIoU", "source (day)")):
            if key in m:
                ax.plot(m["step"] + offsets[stage], m[key], "o-", ms=3, color=colours[stage], label=LABELS[stage])
                ax.set_title(f"mIoU on {title}")
            cal = m.dropna(subset=[f"calibrated/{key}"]) if f"calibrated/{key}" in m else None
            if cal is not None and len(cal):  # the stage's calibrated model: a star at its last step
                ax.plot(cal["step"] + offsets[stage], cal[f"calibrated/{key}"], "*", ms=10, color=colours[stage],
                        markeredgecolor="black", markeredgewidth=0.5,
                        label=f"{LABELS[stage]} + calibration" if stage != "source_only" else None)
    for ax in axes:
        ax.set_xlabel("iteration (all stages)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# Columns of the examples figure: (weights file in the stage folder, title); like for like, each
# calibrated model next to the same model uncalibrated.
EXAMPLE_MODELS = (("source_only/model.safetensors", "source only"),
                  ("extra_ce/model.safetensors", "+ extra CE"),
                  ("extra_ce/model_calibrated.safetensors", "+ extra CE\n+ calibration"),
                  ("reward_tuned/model.safetensors", "+ reward tuning"),
                  ("reward_tuned/model_calibrated.safetensors", "+ reward tuning\n+ calibration"))


def _plot_examples(work: Path, s: DemoSettings, seed: int, out: Path, n: int = 3) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.patches import Patch

    from segreward.data.synthetic import CLASSES, PALETTE, SyntheticDataset
    from segreward.models import load_model

    ds = SyntheticDataset(style="dusk", n=n, seed=seed, size=s.size, split="val")
    palette = np.array(PALETTE, dtype=np.uint8)
    models = [(load_model(work / f).eval(), title) for f, title in EXAMPLE_MODELS if (work / f).is_file()]
    cols = ["image", "label"] + [title for _, title in models]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 1.25 * n + 1.0), squeeze=False)
    for i in range(n):
        x, y = ds[i]
        panels = [ds.images[i], palette[np.clip(y.numpy(), 0, len(palette) - 1)]]
        with torch.no_grad():
            for model, _ in models:
                panels.append(palette[model(x[None]).argmax(1)[0].numpy()])
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="black", linewidth=0.3, label=name)
               for name, c in zip(CLASSES, PALETTE)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path = "runs/demo", seeds=(0,), quick: bool = False, progress: bool = True,
             method: str = DEFAULT_METHOD, threads: int | None = None) -> dict:
    """Run the demo; returns ``{"per_seed", "table", "next", "report" (path), "runtime_s", "cpu_s",
    "threads"}``. The same seeds and thread count give the same numbers (float sums depend on how
    the work is split over threads); ``threads`` sets torch's CPU threads (default: torch's own)."""
    import torch

    from segreward.errors import SegrewardError
    from segreward.outputs import atomic_save, atomic_write_text, claim_dir, ensure_dir

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SegrewardError(f"--threads must be a whole number >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    s = DemoSettings.quick(method=method) if quick else DemoSettings(method=method)
    out = claim_dir(out, "--out", "demo")  # never over a user's own files
    t0, c0 = time.perf_counter(), time.process_time()
    per_seed = {}
    for seed in seeds:
        per_seed[int(seed)] = run_seed(out / f"seed{seed}", s, int(seed), progress=progress)
    runtime, cpu = time.perf_counter() - t0, time.process_time() - c0
    threads = torch.get_num_threads()
    table = summary_table(per_seed)
    first = out / f"seed{seeds[0]}"
    atomic_save(out / "miou_curves.png", lambda tmp: _plot_curves(first, tmp))
    atomic_save(out / "examples.png", lambda tmp: _plot_examples(first, s, int(seeds[0]), tmp))
    command = ("segreward demo" + (" --quick" if quick else "") + (f" --seeds {' '.join(map(str, seeds))}" if tuple(seeds) != (0,) else "")
               + (f" --method {method}" if method != DEFAULT_METHOD else "") + f" --threads {threads}")
    import yaml
    specs = {"heldout": _data(s, int(seeds[0]))["val"]["target"], "labelled": _calibration(s, int(seeds[0]))["data"]}
    spec_files = {}
    for name, spec in specs.items():  # dataset specs of this run's dusk sets, for evaluate / calibrate
        spec_files[name] = ensure_dir(out / "data", "--out") / f"dusk_{name}_seed{seeds[0]}.yaml"
        atomic_write_text(spec_files[name], yaml.safe_dump(spec, sort_keys=False))
    nxt = next_steps(out, int(seeds[0]), len(seeds), s.method, spec_files["heldout"], spec_files["labelled"])
    report = out / "report.md"
    atomic_write_text(report,
        f"# segreward demo\n\nCommand: `{command}` — {runtime / 60:.1f} min wall, {cpu / 60:.1f} CPU-min, "
        f"{threads} torch thread(s) (the same seeds and `--threads` give the same numbers; another thread count "
        f"changes float sums, and so the later digits).\n\n"
        f"Synthetic street scenes, {s.size[0]}x{s.size[1]}: source = day ({s.n_source} labelled), target = dusk "
        f"({s.n_target_labelled} labelled for fine-tuning, {s.n_eval} held out); the target stages train on the "
        f"dusk images plus {s.n_replay} replayed day images. Iterations of batch "
        f"{s.batch_size}: pretrain {s.pretrain_iters}, CE fine-tune {s.finetune_iters}, then {s.extra_iters} more of "
        f"either cross-entropy or reward tuning (`{s.method}`: {METHODS[s.method][1]}; Adam lr {s.tune_lr}), "
        f"both from the same CE fine-tuned checkpoint. *+ calibration*: one logit offset per class fitted on the "
        f"{s.n_target_labelled} labelled dusk images (not the held-out ones) and folded into the weights; no "
        f"training.\n\n{table}\n\n"
        f"![mIoU per stage](miou_curves.png)\n\n![example predictions on held-out dusk images](examples.png)\n\n"
        f"{nxt}")
    atomic_write_text(out / "results.json", json.dumps({"settings": s.__dict__, "per_seed": per_seed, "runtime_s": runtime,
                                                        "cpu_s": cpu, "threads": threads}, indent=1, default=list))
    return {"per_seed": per_seed, "table": table, "next": nxt, "report": str(report), "runtime_s": runtime,
            "cpu_s": cpu, "threads": threads}
