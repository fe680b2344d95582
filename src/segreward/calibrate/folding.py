"""Folding offsets into a model, so inference needs nothing new.

The last layer of a segmentation model is a 1x1 convolution (or linear map) ``W h + bias`` per
pixel, and what follows it (bilinear resizing, whose weights sum to 1) carries a per-class
constant through unchanged. So ``argmax(logits + b)`` is the argmax of the same model with
``bias + b``: :func:`fold_offsets` writes them there. It knows

* the built-in models (``model.classifier_name``: U-Net ``classifier``, SegFormer
  ``model.decode_head.classifier``),
* Hugging Face ``SegformerForSemanticSegmentation`` (``decode_head.classifier``),
* MMSegmentation segmentors (``decode_head.conv_seg``; the auxiliary head is not used at inference),

and :func:`fold_state_dict` does the same on a checkpoint's state dict (an mmseg checkpoint
stays an mmseg checkpoint). A last layer without a bias cannot hold the offsets: wrap the model
in :class:`WithOffsets` instead, which adds them to its output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from segreward.errors import SegrewardError

__all__ = ["WithOffsets", "classifier_of", "fold_offsets", "fold_state_dict", "CLASSIFIER_KEYS"]

# Last-layer names tried in order, for models without a ``classifier_name``.
CLASSIFIER_KEYS = ("decode_head.conv_seg", "model.decode_head.classifier", "decode_head.classifier", "classifier")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def classifier_of(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, layer)`` of the model's last classification layer."""
    model = _unwrap(model)
    names = [getattr(model, "classifier_name", None), *CLASSIFIER_KEYS]
    for name in names:
        if not name:
            continue
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if hasattr(layer, "weight"):
            return name, layer
    raise SegrewardError(f"{type(model).__name__}: cannot find the last classification layer (tried "
                         f"{', '.join(CLASSIFIER_KEYS)}; set model.classifier_name); use WithOffsets(model, offsets)")


def _as_offsets(offsets, num_classes: int, where: str) -> torch.Tensor:
    """``offsets`` as a float64 tensor ``[C]``, or a one-line error: C finite numbers (a list, a tensor,
    ``Calibration.offsets``), not None, a string or anything else."""
    try:
        if offsets is None or isinstance(offsets, (str, bytes)):
            raise TypeError
        b = torch.as_tensor(offsets, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise SegrewardError(f"{where}: offsets = {offsets!r:.60} are not numbers; give {num_classes} numbers, one per "
                             "class (a list, a tensor, or Calibration.offsets)") from None
    if b.numel() != num_classes:
        raise SegrewardError(f"{where}: {b.numel()} offsets for a classifier with {num_classes} classes "
                             "(calibrated for another number of classes?)")
    if not bool(torch.isfinite(b).all()):
        raise SegrewardError(f"{where}: offsets must be finite, got {b.tolist()}")
    return b


@torch.no_grad()
def fold_offsets(model: nn.Module, offsets) -> nn.Module:
    """Add ``offsets [C]`` to the bias of the model's last layer, in place; returns the model."""
    name, layer = classifier_of(model)
    out = layer.weight.shape[0]
    b = _as_offsets(offsets, out, f"{type(_unwrap(model)).__name__}.{name}")
    if getattr(layer, "bias", None) is None:
        raise SegrewardError(f"{type(_unwrap(model)).__name__}.{name} has no bias to hold the offsets; use "
                             "WithOffsets(model, offsets), which adds them to the model's output")
    layer.bias.add_(b.to(layer.bias))
    return model


def fold_state_dict(state_dict: dict, offsets, key: str | None = None) -> tuple[dict, str]:
    """A copy of ``state_dict`` with ``offsets`` added to the last layer's bias, and that key.

    ``key`` defaults to the first of ``<name>.bias`` for the names in :data:`CLASSIFIER_KEYS`
    (after a ``module.`` prefix, if any) present in the dict.
    """
    if key is None:
        for name in CLASSIFIER_KEYS:
            for prefix in ("", "module."):
                if f"{prefix}{name}.bias" in state_dict:
                    key = f"{prefix}{name}.bias"
                    break
            if key:
                break
        if key is None:
            weights = [k for k in CLASSIFIER_KEYS if f"{k}.weight" in state_dict]
            why = f"{weights[0]} has no bias; use WithOffsets" if weights else \
                f"none of {', '.join(k + '.bias' for k in CLASSIFIER_KEYS)} is in it"
            raise SegrewardError(f"cannot fold offsets into this state dict: {why}")
    if key not in state_dict:
        raise SegrewardError(f"cannot fold offsets: no key {key!r} in the state dict")
    bias = state_dict[key]
    b = _as_offsets(offsets, bias.numel(), key)
    out = dict(state_dict)
    out[key] = (bias.to(torch.float64) + b).to(bias.dtype)
    return out, key


class WithOffsets(nn.Module):
    """``model(x) + offsets``: calibration for a model whose last layer has no bias.

    The offsets are a buffer (saved in ``state_dict`` as ``offsets``); the wrapped model's
    output must be logits ``[B, C, ...]``.
    """

    def __init__(self, model: nn.Module, offsets):
        super().__init__()
        self.model = model
        c = getattr(_unwrap(model), "num_classes", None)
        b = _as_offsets(offsets, c if isinstance(c, int) else torch.as_tensor(offsets).numel(), "WithOffsets")
        self.register_buffer("offsets", b.float())
        self.num_classes = b.numel()

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[1] != self.offsets.numel():
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SegrewardError(f"WithOffsets: the model returned {shape}, not logits [B, "
                                 f"{self.offsets.numel()}, ...]")
        return out + self.offsets.to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))
