"""Reading images and label maps from disk (Pillow), with errors that name the file.

Label maps are read as class indices whatever their encoding:

* 8-bit grayscale (mode ``L``) and 16/32-bit integer (modes ``I;16``, ``I``): the pixel values;
* palette PNGs (mode ``P``, e.g. Pascal VOC): the palette *indices*, not the colours;
* RGB colour-coded maps: only with an explicit ``palette`` (colour -> id); otherwise rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from segreward.errors import SegrewardError

Palette = Mapping[tuple[int, int, int], int] | Sequence[Sequence[int]]


def _open(path: str | Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise SegrewardError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SegrewardError(f"{path}: cannot read image ({e}); is the file corrupt or truncated?") from None
    return img


def read_image(path: str | Path) -> np.ndarray:
    """An image as ``uint8`` RGB array ``[H, W, 3]``."""
    return np.asarray(_open(path).convert("RGB"))


def _palette_lookup(palette: Palette) -> dict[tuple[int, int, int], int]:
    if isinstance(palette, Mapping):
        return {tuple(int(v) for v in colour): int(i) for colour, i in palette.items()}
    return {tuple(int(v) for v in colour): i for i, colour in enumerate(palette)}


def rgb_to_label(rgb: np.ndarray, palette: Palette, unknown: int = 255, path: str | Path = "<array>") -> np.ndarray:
    """Map an RGB colour-coded label ``[H, W, 3]`` to ids; colours not in ``palette`` become ``unknown``."""
    lookup = _palette_lookup(palette)
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in lookup], dtype=np.int64)
    vals = np.array(list(lookup.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    hit = keys[pos] == code
    return np.where(hit, vals[pos], unknown)


def read_label(path: str | Path, palette: Palette | None = None) -> np.ndarray:
    """A label map as an integer array ``[H, W]`` of class ids (see the module doc for encodings)."""
    img = _open(path)
    mode = img.mode
    if mode in ("L", "P", "1"):
        return np.asarray(img, dtype=np.uint8) if mode != "1" else np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img).astype(np.int64)
    if mode in ("RGB", "RGBA"):
        if palette is None:
            raise SegrewardError(
                f"{path}: label map has {len(mode)} channels (mode {mode}); give a palette (colour -> id) "
                "to decode a colour-coded label, or use single-channel class-id PNGs"
            )
        return rgb_to_label(np.asarray(img.convert("RGB")), palette, path=path)
    raise SegrewardError(f"{path}: unsupported label image mode {mode!r}; expected L, P, I;16, I or RGB with a palette")
