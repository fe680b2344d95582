"""Frequencies and weights as a terminal table, JSON, CSV and a bar chart (log scale)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from segreward.stats.counting import ClassFrequencies
from segreward.stats.weights import ClassWeights


def frequency_table(freq: ClassFrequencies) -> str:
    """A readable table: one row per class, then the totals and what was not counted."""
    width = max([5] + [len(n) for n in freq.class_names])
    share = freq.frequencies
    n_img = max(freq.num_images, 1)
    lines = [f"{'id':>3}  {'class':<{width}}  {'pixels':>15}  {'share %':>8}  {'images':>7}  {'in % img':>8}"]
    for i, name in enumerate(freq.class_names):
        flag = "  <- absent" if freq.counts[i] == 0 else ""
        lines.append(f"{i:>3}  {name:<{width}}  {int(freq.counts[i]):>15,}  {100 * share[i]:>8.3f}  "
                     f"{int(freq.images_with_class[i]):>7}  {100 * freq.images_with_class[i] / n_img:>8.1f}{flag}")
    lines.append(f"{'':>3}  {'total':<{width}}  {freq.total_pixels:>15,}  {100.0 if freq.total_pixels else 0:>8.3f}  "
                 f"{freq.num_images:>7}")
    lines.append(f"ignored pixels: {freq.ignored_pixels:,}; unknown pixels: {freq.unknown_pixels:,}")
    return "\n".join(lines)


def notes(freq: ClassFrequencies) -> list[str]:
    """Warnings worth a line on stderr: unknown values, skipped files, absent classes."""
    out = []
    if freq.unknown_pixels:
        values = ", ".join(f"{v}: {c:,} px" for v, c in list(freq.unknown_values.items())[:10])
        example = freq.files_with_unknown[0][0] if freq.files_with_unknown else "?"
        out.append(f"{freq.unknown_pixels:,} pixels in {freq.num_files_with_unknown} file(s) have values that are "
                   f"neither a class (0..{freq.num_classes - 1}) nor ignored, counted as 'unknown' ({values}); "
                   f"e.g. {example}; use --strict to stop at them")
    if freq.num_skipped:
        first = freq.skipped[0]
        out.append(f"skipped {freq.num_skipped} bad file(s); first: {first[0]}: {first[1]}")
    absent = [f"{i} ({n})" for i, n in enumerate(freq.class_names) if freq.counts[i] == 0]
    if absent:
        out.append(f"{len(absent)} class(es) never occur: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
    return out


def write_csv(freq: ClassFrequencies, path: str | Path) -> Path:
    import io

    from segreward.outputs import atomic_write_text

    path = Path(path)
    fh = io.StringIO(newline="")
    writer = csv.writer(fh)
    writer.writerow(["class_id", "class_name", "pixels", "frequency", "images_with_class",
                     "pixels_in_images_with_class"])
    for i, name in enumerate(freq.class_names):
        writer.writerow([i, name, int(freq.counts[i]), f"{freq.frequencies[i]:.10g}",
                         int(freq.images_with_class[i]), int(freq.pixels_in_images_with_class[i])])
    atomic_write_text(path, fh.getvalue())
    return path


def plot_frequencies(freq: ClassFrequencies, path: str | Path) -> Path:
    """A bar chart of the class shares on a log scale (absent classes shown as empty slots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    share = 100 * freq.frequencies
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * freq.num_classes + 2), 4.5))
    ax.bar(np.arange(freq.num_classes), np.where(share > 0, share, np.nan), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(freq.num_classes))
    ax.set_xticklabels(freq.class_names, rotation=90, fontsize=8 if freq.num_classes <= 40 else 5)
    ax.set_ylabel("share of counted pixels (%)")
    ax.set_title(f"class pixel frequencies ({freq.num_images} images, {freq.total_pixels:,} pixels)")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    from segreward.outputs import atomic_save

    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
    return path


def save_frequencies(freq: ClassFrequencies, out_dir: str | Path, plot: bool = False) -> list[Path]:
    """Write ``frequencies.json``, ``frequencies.csv`` and, with ``plot``, ``frequencies.png``."""
    from segreward.outputs import atomic_write_text, check_output_file, ensure_dir

    out = ensure_dir(out_dir, "--out")
    names = ["frequencies.json", "frequencies.csv"] + (["frequencies.png"] if plot else [])
    json_path, csv_path, *_ = [check_output_file(out / n, "--out") for n in names]
    atomic_write_text(json_path, json.dumps(freq.to_dict(), indent=2) + "\n")
    paths = [json_path, write_csv(freq, csv_path)]
    if plot:
        paths.append(plot_frequencies(freq, out / "frequencies.png"))
    return paths


def weights_table(cw: ClassWeights, counts: np.ndarray | None = None) -> str:
    width = max([5] + [len(n) for n in cw.class_names])
    total = float(np.sum(counts)) if counts is not None else 0.0
    head = f"{'id':>3}  {'class':<{width}}  " + (f"{'share %':>8}  " if counts is not None else "") + f"{'weight':>9}"
    lines = [head]
    for i, name in enumerate(cw.class_names):
        share = f"{100 * counts[i] / total if total else 0:>8.3f}  " if counts is not None else ""
        mark = "  (zero pixels)" if i in cw.zero_classes else ("  (capped)" if i in cw.capped_classes else "")
        lines.append(f"{i:>3}  {name:<{width}}  {share}{cw.weights[i]:>9.4f}{mark}")
    lines.append(f"method {cw.method} {cw.params}; mean weight {float(np.mean(cw.weights)):.4f}")
    return "\n".join(lines)
