"""Turning command-line strings into class names, label maps and palettes (with clear errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segreward.data.meta import get_meta, known_datasets
from segreward.errors import SegrewardError


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegrewardError(f"{path}: cannot read the {what} JSON ({e})") from None


def parse_class_names(value: str) -> tuple[list[str], str | None]:
    """``value`` is a dataset name (then its names and defaults apply: returns the name too),
    a file (``.json`` list, or text with one name per line) or a comma-separated list."""
    if value.lower() in known_datasets():
        return list(get_meta(value).classes), value.lower()
    path = Path(value)
    if path.is_file():
        if path.suffix.lower() == ".json":
            data = _read_json(path, "class names")
            if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
                raise SegrewardError(f"{path}: expected a JSON list of class names")
            names = data
        else:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif "," in value:
        names = [s.strip() for s in value.split(",")]
    else:
        raise SegrewardError(f"--class-names {value!r}: not a known dataset ({', '.join(known_datasets())}), "
                             "not a file, and not a comma-separated list of names")
    if not names or any(not s for s in names):
        raise SegrewardError(f"--class-names {value!r}: empty class name(s)")
    return names, None


def parse_label_map(value: str) -> dict[int, int]:
    """A raw id -> train id map from a JSON file (``{"7": 0, "8": 1}``) or inline ``7:0,8:1``."""
    path = Path(value)
    if path.is_file():
        data = _read_json(path, "label map")
        if not isinstance(data, dict):
            raise SegrewardError(f"{path}: expected a JSON object mapping raw ids to train ids, e.g. {{\"7\": 0}}")
        items = list(data.items())
        where = str(path)
    else:
        try:
            items = [tuple(part.split(":")) for part in value.split(",") if part.strip()]
        except ValueError:
            items = []
        where = f"--label-map {value!r}"
        if not items or any(len(it) != 2 for it in items):
            raise SegrewardError(f"{where}: not a file and not of the form RAW:TRAIN,RAW:TRAIN (e.g. 7:0,8:1)")
    try:
        return {int(k): int(v) for k, v in items}
    except (TypeError, ValueError):
        raise SegrewardError(f"{where}: label map keys and values must be integers") from None


def parse_palette(value: str) -> dict[tuple[int, int, int], int]:
    """A colour -> id palette: a dataset name (its palette, colour i -> id i), or a JSON file with
    a list of ``[R, G, B]`` (position = id) or an object ``{"R,G,B": id}``."""
    if value.lower() in known_datasets():
        return {tuple(c): i for i, c in enumerate(get_meta(value).palette)}
    path = Path(value)
    if not path.is_file():
        raise SegrewardError(f"--palette {value!r}: not a known dataset ({', '.join(known_datasets())}) and not "
                             "a JSON file")
    data = _read_json(path, "palette")
    try:
        if isinstance(data, list):
            palette = {tuple(int(v) for v in colour): i for i, colour in enumerate(data)}
        elif isinstance(data, dict):
            palette = {tuple(int(v) for v in str(k).split(",")): int(i) for k, i in data.items()}
        else:
            raise ValueError
        if not palette or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise ValueError
    except (TypeError, ValueError):
        raise SegrewardError(f"{path}: a palette is a JSON list of [R, G, B] (position = class id) or an object "
                             "{\"R,G,B\": id}, with values 0-255") from None
    return palette
