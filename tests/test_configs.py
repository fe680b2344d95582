"""Every example config in configs/ loads and validates (keys, types, ranges)."""

from pathlib import Path

import pytest

from segreward.engine import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    if cfg.loss.estimator == "local":
        assert cfg.loss.scope in ("image", "batch", "running")
