"""Segmentation models by short name, and weights IO.

    model = build_model("unet", num_classes=8)              # built-in, ~0.5-1.1 M parameters
    model = build_model("segformer", 19, variant="b0")      # needs the 'transformers' extra
    load_weights(model, "weights.safetensors")              # or .pt/.pth, or an mmseg checkpoint
    save_weights(model, "run/model.safetensors")
    model = load_model("run/model.safetensors")             # rebuild from the recorded spec

Every model maps images ``[B, 3, H, W]`` (normalised) to logits ``[B, C, h, w]``; ``h, w`` is
``H, W`` for ``unet`` and ``H/4, W/4`` for ``segformer`` (``model.output_stride``); the losses
upsample. Every model has ``num_classes`` and ``classifier_name`` (its last layer).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from segreward.errors import SegrewardError
from segreward.models.unet import UNet
from segreward.models.weights import load_weights, read_state_dict, save_weights

__all__ = ["MODELS", "UNet", "build_model", "count_parameters", "load_model", "load_weights", "read_state_dict",
           "register_model", "save_weights"]


def _segformer(num_classes: int, **kw) -> nn.Module:
    from segreward.models.adapters import SegFormer
    return SegFormer(num_classes, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {"unet": UNet, "segformer": _segformer}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(num_classes, **kw) -> nn.Module`` available to ``build_model`` and configs."""
    MODELS[name.lower()] = builder


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A model by short name (``unet``, ``segformer``); keyword options go to its builder."""
    key = str(name).lower()
    if key not in MODELS:
        raise SegrewardError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SegrewardError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    builder = MODELS[key]
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # open builders check their own options
        valid = [p for p in params if p not in ("self", "num_classes")]
        bad = sorted(set(kwargs) - set(valid))
        if bad:
            raise SegrewardError(f"model {name!r}: unknown option(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    model = builder(num_classes, **kwargs)
    model.segreward_spec = {"model": key, "num_classes": num_classes, "options": dict(kwargs)}
    return model


def load_model(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_weights` from its recorded spec and load its weights."""
    _, meta = read_state_dict(path)
    if "model" not in meta or "num_classes" not in meta:
        raise SegrewardError(f"{path}: weights without a model spec (not written by `segreward train` or "
                             "save_weights); give a run directory or its model.safetensors (in Python: build_model() "
                             "and load_weights(model, path))")
    options = {**meta.get("options", {}), **overrides}
    model = build_model(meta["model"], int(meta["num_classes"]), **options)
    load_weights(model, path)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
