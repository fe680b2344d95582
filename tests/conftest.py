"""Fixtures shared by test modules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def five_class_spec(tmp_path):
    """A dataset spec of one 16x16 image in the mmseg layout with 5 classes (the built-in
    synthetic data and the models trained on it have 8)."""
    root = tmp_path / "five"
    (root / "img_dir").mkdir(parents=True)
    (root / "ann_dir").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "img_dir" / "a.jpg")
    Image.fromarray(np.full((16, 16), 2, np.uint8)).save(root / "ann_dir" / "a.png")
    spec = tmp_path / "five.yaml"
    spec.write_text(json.dumps({"type": "folder", "root": str(root), "classes": 5}))
    return spec


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("da")``: a script of ``benchmarks/`` as a module (the folder is not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
