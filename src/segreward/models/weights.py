"""Loading and saving model weights: torch state dicts, safetensors, mmseg checkpoints.

Accepted files:

* ``.safetensors`` -- a flat state dict (``safetensors.torch.load_file``);
* ``.pt`` / ``.pth`` / anything else -- ``torch.load(weights_only=True)`` of a state dict, of an
  mmseg/mmengine checkpoint (``{"state_dict": ..., "meta": ...}``), or of a dict holding the
  state dict under ``"model"``.

Prefixes added by DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed. Keys
that do not match, and classifier shapes that say "another number of classes", are errors that
name the file and the numbers.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from segreward.errors import SegrewardError

_STRIP = ("module.", "_orig_mod.")


_FORMATS = "a .pt/.pth file of torch.save(model.state_dict()), an mmseg checkpoint, or a .safetensors file"


def not_a_checkpoint(path: Path, why: str, what: str = "weights file") -> SegrewardError:
    """The one message for a file that is no checkpoint at all (text, YAML, a bare tensor, a folder)."""
    return SegrewardError(f"{path}: not a checkpoint ({why}); give {what if what != 'weights file' else _FORMATS}")


def _looks_like_text(path: Path) -> bool:
    try:
        head = path.read_bytes()[:512]
        head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\x00" not in head


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte header length, then JSON)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def torch_load(path: Path, what: str = "weights file"):
    """``torch.load(weights_only=True)`` whose failures are one line: not a checkpoint (text, YAML,
    pickled Python objects, damaged), never torch's multi-line ``weights_only`` advice."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise not_a_checkpoint(path, "a folder", what) from None
    except FileNotFoundError:
        raise SegrewardError(f"{path}: {what} not found") from None
    except PermissionError as e:
        raise SegrewardError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except pickle.UnpicklingError as e:
        if _looks_like_text(path):
            raise not_a_checkpoint(path, "a text file", what) from None
        if "Weights only load failed" in str(e) and "GLOBAL" in str(e).upper():
            raise not_a_checkpoint(path, "it holds Python objects other than tensors and plain data, which are not "
                                   "loaded for safety", what) from None
        raise not_a_checkpoint(path, "not a torch file, or a damaged one", what) from None
    except Exception:  # noqa: BLE001 - torch raises many types (RuntimeError, KeyError, EOFError, ...) on junk
        why = ("a text file" if _looks_like_text(path) else "a safetensors weights file" if is_safetensors(path)
               else "not a torch file, or a damaged one")
        raise not_a_checkpoint(path, why, what) from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` from a weights file (see the module doc for the formats)."""
    path = Path(path)
    if path.is_dir():
        raise not_a_checkpoint(path, "a folder")
    if not path.is_file():
        raise SegrewardError(f"{path}: weights file not found")
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
            sd = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            why = "a text file" if _looks_like_text(path) else f"not a readable safetensors file: {e}"
            raise not_a_checkpoint(path, why) from None
        if "segreward" in raw:
            try:
                meta = json.loads(raw["segreward"])
            except json.JSONDecodeError:
                meta = {}
        return sd, meta
    obj = torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, meta = obj["model"], obj.get("meta") or {}
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise not_a_checkpoint(path, f"it holds a {type(obj).__name__}, not a state dict (names -> tensors)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        why = f"entries {bad[:3]} are not tensors" if bad else "it holds no tensors"
        raise not_a_checkpoint(path, f"{why}; a state dict maps names to tensors")
    return dict(sd), dict(meta) if isinstance(meta, dict) else {}


def _normalise_keys(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _STRIP:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    # Adapters wrap the library model as ``self.model``: accept the library's own key names too.
    if model_keys and all(k.startswith("model.") for k in model_keys) and not any(k in model_keys for k in out):
        prefixed = {"model." + k: v for k, v in out.items()}
        if any(k in model_keys for k in prefixed):
            out = prefixed
    return out


def _classes_in_meta(meta: dict[str, Any]) -> int | None:
    for m in (meta, meta.get("dataset_meta") or {}, meta.get("segreward") or {}):
        if isinstance(m, dict):
            if isinstance(m.get("num_classes"), int):
                return m["num_classes"]
            if isinstance(m.get("classes"), (list, tuple)):
                return len(m["classes"])
    return None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a weights file into ``model``; returns the file's metadata (``{}`` when none).

    ``strict=False`` loads the tensors whose names and shapes match and skips the rest (e.g. a
    classifier trained for other classes); the returned dict then lists ``missing`` and
    ``skipped`` keys.
    """
    path = Path(path)
    sd, meta = read_state_dict(path)
    own = model.state_dict()
    sd = _normalise_keys(sd, set(own))
    expected = getattr(model, "num_classes", None)
    head = getattr(model, "classifier_name", None)
    found = _classes_in_meta(meta)
    if head is not None and f"{head}.weight" in sd:
        found = int(sd[f"{head}.weight"].shape[0])
    if strict and expected is not None and found is not None and found != expected:
        raise SegrewardError(f"{path}: checkpoint is for num_classes={found} but the model has num_classes={expected}; "
                             f"build the model with num_classes={found}, or load with strict=False "
                             "(model.checkpoint_strict: false) to keep everything but the classifier")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {name} keys (e.g. {', '.join(keys[:3])})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} keys with other shapes (e.g. {k}: file {tuple(sd[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        kind = type(model).__name__
        raise SegrewardError(f"{path}: weights do not fit the model {kind}: {'; '.join(parts)}; "
                             "is the checkpoint for another architecture or width?")
    keep = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(keep, strict=False)
    out = dict(meta)
    if not strict:
        out.update(missing=sorted(set(own) - set(keep)), skipped=sorted(set(sd) - set(keep)))
    return out


def save_weights(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the model's weights atomically (temp file + ``os.replace``).

    ``.safetensors``: a flat safetensors file, ``meta`` as JSON under the ``segreward`` key of its
    metadata. Otherwise ``torch.save({"state_dict": ..., "meta": ...})`` -- the mmengine layout,
    so MMSegmentation's ``load_checkpoint`` reads it too. ``meta`` defaults to how the model was
    built (``build_model`` records it), which lets :func:`segreward.models.load_model` rebuild it.
    """
    path = Path(path)
    if meta is None:
        meta = dict(getattr(model, "segreward_spec", None) or {})
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(sd, str(tmp), metadata={"segreward": json.dumps(meta)})
        else:
            torch.save({"state_dict": sd, "meta": meta}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SegrewardError(f"{path}: cannot write weights ({e})") from None
    return path
