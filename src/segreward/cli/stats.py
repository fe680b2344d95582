"""``segreward stats freq ROOT`` and ``segreward stats weights FREQ_JSON``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from segreward.errors import SegrewardError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from segreward.stats.weights import DEFAULT_BETA, DEFAULT_SMOOTH, WEIGHT_METHODS

    parser = subparsers.add_parser(
        "stats", help="class pixel frequencies and class weights of a label folder",
        description="Class statistics of an annotation folder: `freq` counts pixels per class, "
                    "`weights` turns the counts into class weights for a loss.")
    sub = parser.add_subparsers(dest="stats_command", metavar="SUBCOMMAND", required=True)

    f = sub.add_parser(
        "freq", help="count pixels per class in a folder of label maps",
        description="Count pixels per class in every label map under ROOT (recursively) and write "
                    "frequencies.json and frequencies.csv into --out. Label maps may be 8-bit, palette "
                    "(indices) or 16-bit PNGs; RGB colour-coded maps need --palette.")
    f.add_argument("root", metavar="ROOT", help="folder of label maps (or one file)")
    f.add_argument("--suffix", default=".png", help="count files whose names end with this (default: .png; "
                   "e.g. _labelTrainIds.png)")
    f.add_argument("--no-recursive", dest="recursive", action="store_false", help="do not look into subfolders")
    f.add_argument("--class-names", metavar="NAMES",
                   help="a dataset name (sets names, number of classes, ignore index, label map, "
                        "reduce-zero-label), a file (one name per line, or a JSON list) or a comma-separated list")
    f.add_argument("--num-classes", type=_positive_int, help="number of classes (default: from --class-names, "
                   "else the largest counted value + 1)")
    f.add_argument("--ignore-index", type=int, action="append", metavar="ID",
                   help="label value to leave out (repeatable; default 255, or the dataset's)")
    f.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="ADE20K style: raw 0 is ignored and every other value v becomes v - 1")
    f.add_argument("--label-map", metavar="MAP", help="raw id -> train id: a JSON file {\"7\": 0, ...} or "
                   "inline 7:0,8:1 (default: the dataset's, e.g. cityscapes_labelids)")
    f.add_argument("--ignore-unlisted", action="store_true", default=None,
                   help="with --label-map: raw values missing from the map are ignored (default: kept as they are)")
    f.add_argument("--palette", metavar="PALETTE", help="decode RGB colour-coded labels: a dataset name or a JSON "
                   "file with a list of [R,G,B] (position = id) or {\"R,G,B\": id}")
    f.add_argument("--strict", action="store_true", help="a value that is neither a class nor ignored is an error "
                   "naming the file (default: count it as 'unknown' and report it)")
    f.add_argument("--skip-bad", action="store_true", help="skip unreadable files (and, with --strict, files with "
                   "out-of-range values) and report how many, instead of stopping at the first")
    f.add_argument("--workers", type=_positive_int, help="worker processes (default: all cores)")
    f.add_argument("--out", default=".", help="folder for frequencies.json / .csv / .png (default: .)")
    f.add_argument("--plot", action="store_true", help="also write a bar chart frequencies.png (log scale)")
    f.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is shown only on a terminal anyway)")
    f.set_defaults(func=_freq)

    w = sub.add_parser(
        "weights", help="class weights from frequencies.json",
        description="Class weights from the counts in frequencies.json; writes weights.json and prints a "
                    "class_weight=[...] line for MMSegmentation. By default the weights average 1.")
    w.add_argument("freq_json", metavar="FREQ_JSON",
                   help="frequencies.json from `segreward stats freq` (or its folder)")
    w.add_argument("--method", choices=WEIGHT_METHODS, default="cvc",
                   help="cvc: 1/(C_c + s*T) (default); inv_freq: 1/f_c; sqrt_inv_freq: 1/sqrt(f_c); "
                        "median_freq: median(f)/f_c (SegNet); effective_num: (1-beta)/(1-beta^C_c) (Cui et al.)")
    w.add_argument("--smooth", type=float, default=DEFAULT_SMOOTH, help=f"s of cvc (default {DEFAULT_SMOOTH})")
    w.add_argument("--beta", type=float, default=DEFAULT_BETA,
                   help=f"beta of effective_num (default {DEFAULT_BETA}; pixel counts need one much closer to 1)")
    w.add_argument("--max-weight", type=float, help="cap the final weights at this value")
    w.add_argument("--zero-weight", type=float, metavar="W",
                   help="weight of classes with zero pixels (default: that of the rarest class that occurs)")
    w.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="keep the raw formula values instead of scaling them to average 1")
    w.add_argument("--out", help="folder for weights.json (default: the folder of FREQ_JSON)")
    w.set_defaults(func=_weights)


def _warn(text: str) -> None:
    print(f"segreward stats: warning: {text}", file=sys.stderr)


def _freq(args: argparse.Namespace) -> int:
    from segreward.stats import class_frequencies, frequency_table, parse_class_names, parse_label_map, parse_palette
    from segreward.stats.report import notes, save_frequencies

    from segreward.outputs import ensure_dir

    names, dataset = parse_class_names(args.class_names) if args.class_names else (None, None)
    if args.ignore_unlisted and not args.label_map:
        raise SegrewardError("--ignore-unlisted needs --label-map")
    ensure_dir(args.out, "--out")  # before counting: a bad --out should not cost a pass over the data
    freq = class_frequencies(
        args.root, suffix=args.suffix, recursive=args.recursive, class_names=names, workers=args.workers,
        progress=None if args.progress else False, dataset=dataset, num_classes=args.num_classes,
        ignore_index=args.ignore_index,
        reduce_zero_label=args.reduce_zero_label,
        label_map=parse_label_map(args.label_map) if args.label_map else None,
        map_unlisted=args.ignore_unlisted, palette=parse_palette(args.palette) if args.palette else None,
        strict=args.strict, skip_bad=args.skip_bad,
        exclude=[Path(args.out) / n for n in ("frequencies.png", "frequencies.json", "frequencies.csv")])
    paths = save_frequencies(freq, args.out, plot=args.plot)
    print(frequency_table(freq))
    for line in notes(freq):
        _warn(line)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _weights(args: argparse.Namespace) -> int:
    from segreward.stats import load_frequencies, weights_from_frequencies, weights_table

    from segreward.outputs import check_output_file

    freq = load_frequencies(args.freq_json)
    src = Path(args.freq_json)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    inputs = [src / "frequencies.json" if src.is_dir() else src]
    target = check_output_file(out / "weights.json", "--out", inputs=inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below, one line each
        cw = weights_from_frequencies(freq, args.method, smooth=args.smooth, beta=args.beta,
                                      max_weight=args.max_weight, zero_weight=args.zero_weight,
                                      normalize=args.normalize)
    path = cw.save(target)
    print(weights_table(cw, freq.counts))
    for line in cw.warnings:
        _warn(line)
    print(f"wrote {path}")
    print(cw.mmseg_line())
    return 0
