"""What the model commands (``segreward calibrate``, ``segreward evaluate``) are given, resolved:
a device, a model (a run directory or a weights file) and a labelled set (a dataset spec YAML,
a run config YAML, or a folder in the mmseg layout), with a description of the set that the
outputs record, so a number always says what data it was measured on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from segreward.errors import SegrewardError

__all__ = ["DataChoice", "check_batch_size", "resolve_data", "resolve_device", "resolve_model"]


def check_batch_size(value, what: str = "--batch-size") -> None:
    """A batch size is a whole number >= 1 (not a bool, not a float), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SegrewardError(f"{what} must be a whole number >= 1, got {value!r}")


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps`` as a device that exists here, or a one-line error."""
    from segreward.engine.distributed import check_device
    check_device(device, "--device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_model(path: str | Path):
    """``(model, weights file, classes)`` from a run directory or a weights file."""
    from segreward.models import load_model, read_state_dict
    p = Path(path)
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise SegrewardError(f"{p}: no model.safetensors in this folder; give a finished run directory "
                                 "of `segreward train` or a weights file")
    elif p.exists():
        weights = p
    else:
        raise SegrewardError(f"{p}: no such run directory or weights file")
    model = load_model(weights)
    _, meta = read_state_dict(weights)
    return model, weights, meta.get("classes")


@dataclass
class DataChoice:
    """A resolved labelled set and what it is.

    Attributes:
        dataset: ``(image, label)`` items, no augmentation.
        info: ``{"path", "kind" ("folder" | "dataset spec" | "run config"), "set" (the run
            config's set: "train" or a data.val name), "spec" (the dataset spec used),
            "images"}``: written into the outputs next to the numbers.
        warnings: what the user should know about the choice (e.g. a run config's evaluation
            set: calibrating on it makes that set's scores in-sample).
    """

    dataset: object
    info: dict
    warnings: list = field(default_factory=list)

    def describe(self) -> str:
        """One line: ``<path> (<kind>[, set <name>], type <t>[, split <s>]): <n> images``."""
        i, spec = self.info, self.info.get("spec") or {}
        parts = [i["kind"]] + ([f"set {i['set']}"] if i.get("set") else [])
        parts += [f"type {spec.get('type')}"] + ([f"split {spec['split']}"] if spec.get("split") else [])
        pixels = f", {i['labelled_pixels']:,} labelled pixels" if "labelled_pixels" in i else ""
        return f"{i['path']} ({', '.join(parts)}): {i['images']} images{pixels}"


def _plain(spec: dict) -> dict:
    """A spec as plain YAML/JSON data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def folder_classes(classes: str | None, folder: Path) -> dict:
    """The keywords that give a DATA folder its classes, from ``--classes``: a known dataset name
    (its class list), a number of classes, or comma-separated names."""
    from segreward.data.meta import known_datasets
    if classes.lower() in known_datasets():
        return {"meta": classes.lower()}
    if classes.strip().isdigit():
        return {"classes": int(classes)}
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if len(names) < 2:
        raise SegrewardError(f"--classes {classes!r}: give a known dataset ({', '.join(known_datasets())}), a number "
                             "of classes, or at least two comma-separated names")
    return {"classes": names}


def resolve_data(data: str | Path, split: str | None = None, fmt: str = "folder", size=None,
                 command: str = "calibrate", classes=None, cli_classes: str | None = None) -> DataChoice:
    """A labelled set (no augmentation) from a folder, a dataset spec YAML, or a run config YAML
    (its first ``data.val`` set, or the one ``split`` names, or ``data.train`` with ``split="train"``).
    A plain folder (format ``folder``) holds no class names: ``cli_classes`` (``--classes``: a
    known dataset, a number, or comma-separated names) gives them, else ``classes`` (the model's
    class names)."""
    from segreward.data.meta import known_datasets
    from segreward.engine.builders import build_data
    from segreward.engine.config import config_from_dict, read_yaml
    p = Path(data)
    extra = {**({"split": split} if split else {}), **({"size": tuple(size)} if size else {})}
    if p.is_dir():
        spec = {"type": fmt, "root": str(p), **extra}
        plain = fmt.lower() in ("folder", "mmseg")
        if cli_classes is not None:
            spec.update(folder_classes(cli_classes, p))
        elif classes and plain:
            spec["classes"] = list(classes)
        elif plain:
            raise SegrewardError(f"{p}: a folder in the mmseg layout does not name its classes, and the model has "
                                 "none recorded; give them on the command line: --classes cityscapes (a known "
                                 f"dataset: {', '.join(known_datasets())}), --classes 19, or --classes road,car,...")
        return _choice(build_data(spec), p, "folder", spec)
    if cli_classes is not None:
        raise SegrewardError(f"--classes is for a DATA folder; {p} is a file: give the classes in its dataset spec")
    tree = read_yaml(p, "dataset spec or run config")
    if not isinstance(tree, dict):
        raise SegrewardError(f"{p}: expected a dataset spec (with 'type') or a run config (with 'data'), "
                             f"got {type(tree).__name__}")
    if "type" in tree:
        spec = {**tree, **extra}
        try:
            return _choice(build_data(spec), p, "dataset spec", spec)
        except SegrewardError as e:
            raise SegrewardError(f"{p}: {e}") from None
    if "data" in tree:
        try:
            cfg = config_from_dict(tree)
        except SegrewardError as e:
            raise SegrewardError(f"{p}: {e}") from None
        if split == "train":
            return _choice(build_data(cfg.data.train), p, "run config", cfg.data.train, name="train")
        name = split or next(iter(cfg.data.val), None)
        if name not in cfg.data.val:
            raise SegrewardError(f"{p}: no data.val set {name!r}; choose --split train or one of "
                                 f"{', '.join(cfg.data.val) or '(none)'}")
        choice = _choice(build_data(cfg.data.val[name]), p, "run config", cfg.data.val[name], name=name)
        if command == "calibrate":
            choice.warnings.append(
                f"{p} is a run config: calibrating on its evaluation set data.val.{name} ({choice.info['images']} "
                "images), so that set's calibrated scores are in-sample; give a dataset spec of other labelled "
                "images to keep it held out (see configs/data/)")
        return choice
    raise SegrewardError(f"{p}: neither a dataset spec (no 'type' key) nor a run config (no 'data' key)")


def _choice(dataset, path: Path, kind: str, spec: dict, name: str | None = None) -> DataChoice:
    info = {"path": str(path), "kind": kind, **({"set": name} if name else {}), "spec": _plain(dict(spec)),
            "images": len(dataset)}
    return DataChoice(dataset, info)
