"""Joint image/label transforms on numpy arrays, and conversion to normalised tensors.

A transform is any callable ``t(image uint8 [H,W,3], label int [H,W]) -> (image, label)``; the
label keeps its dtype, pixels that come from padding get ``ignore_index``. Randomness comes from
torch's generator (the global one, or ``generator=``), so ``torch.manual_seed`` makes a run
repeatable and DataLoader workers draw different augmentations.

    t = Compose([RandomScale((0.5, 2.0)), RandomCrop((64, 128)), RandomFlip(), PhotometricJitter()])
    image, label = t(image, label)
    x, y = to_tensor(image, label)          # float32 [3,H,W] normalised, int64 [H,W]

An albumentations pipeline plugs in the same way (``A.Compose([...])(image=im, mask=lb)``
returns a dict; wrap it in a two-line function returning ``(d["image"], d["mask"])``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from segreward.errors import SegrewardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pair = tuple[np.ndarray, np.ndarray]


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(generator)


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise SegrewardError(f"transform: image must be [H, W, 3], got shape {image.shape}")
    if label.shape != image.shape[:2]:
        raise SegrewardError(f"transform: label shape {label.shape} does not match image shape {image.shape[:2]}")


def resize_pair(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> Pair:
    """Resize to ``(h, w)``: image bilinear (Pillow), label nearest (pixel-centre sampling)."""
    h, w = int(size[0]), int(size[1])
    H, W = label.shape
    if (h, w) == (H, W):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return image, label[rows[:, None], cols[None, :]]


class Compose:
    def __init__(self, transforms: Sequence[Callable[[np.ndarray, np.ndarray], Pair]]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to a fixed ``(h, w)``."""

    def __init__(self, size: Sequence[int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_pair(image, label)
        return resize_pair(image, label, self.size)


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale`` (both sides, aspect kept)."""

    def __init__(self, scale: Sequence[float] = (0.5, 2.0), generator: torch.Generator | None = None):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise SegrewardError(f"RandomScale: scale must be (low, high) with 0 < low <= high, got {scale}")
        self.scale, self.generator = (float(scale[0]), float(scale[1])), generator

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_pair(image, label)
        f = _uniform(*self.scale, self.generator)
        H, W = label.shape
        return resize_pair(image, label, (max(1, round(H * f)), max(1, round(W * f))))


class RandomCrop:
    """Crop ``(h, w)`` at a random place; smaller inputs are padded (image with ``pad_value``,
    label with ``ignore_index``) first. ``cat_max_ratio < 1`` retries (up to 10 times) crops
    where one class covers more than that fraction, as mmseg does."""

    def __init__(self, size: Sequence[int], ignore_index: int = 255, pad_value: int = 0,
                 cat_max_ratio: float = 1.0, generator: torch.Generator | None = None):
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index, self.pad_value = ignore_index, pad_value
        self.cat_max_ratio, self.generator = cat_max_ratio, generator

    def _offsets(self, H: int, W: int) -> tuple[int, int]:
        h, w = self.size
        return int(_rand(self.generator) * (H - h + 1)), int(_rand(self.generator) * (W - w + 1))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_pair(image, label)
        h, w = self.size
        H, W = label.shape
        if H < h or W < w:
            ph, pw = max(0, h - H), max(0, w - W)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_value)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
            H, W = label.shape
        y, x = self._offsets(H, W)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[y:y + h, x:x + w]
                counts = np.bincount(crop[crop != self.ignore_index].ravel())
                if counts.size > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = self._offsets(H, W)
        return image[y:y + h, x:x + w], label[y:y + h, x:x + w]


class RandomFlip:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        if _rand(self.generator) < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label


class PhotometricJitter:
    """Random brightness (added, in 0-255 units), contrast and saturation (multiplied) on the image only."""

    def __init__(self, brightness: float = 32.0, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), p: float = 0.5,
                 generator: torch.Generator | None = None):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.p, self.generator = p, generator

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        g = self.generator
        img = image.astype(np.float32)
        if _rand(g) < self.p:
            img += _uniform(-self.brightness, self.brightness, g)
        if _rand(g) < self.p:
            m = img.mean()
            img = (img - m) * _uniform(*self.contrast, g) + m
        if _rand(g) < self.p:
            grey = (img @ np.float32([0.299, 0.587, 0.114]))[..., None]
            img = (img - grey) * _uniform(*self.saturation, g) + grey
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def train_transform(crop_size: Sequence[int] | None = None, scale: Sequence[float] | None = (0.5, 2.0),
                    flip: bool = True, photometric: bool = True, ignore_index: int = 255,
                    generator: torch.Generator | None = None) -> Compose:
    """The usual training pipeline: random scale, crop (when ``crop_size``), flip, photometric jitter."""
    ts: list[Callable] = []
    if scale is not None:
        ts.append(RandomScale(scale, generator))
    if crop_size is not None:
        ts.append(RandomCrop(crop_size, ignore_index=ignore_index, generator=generator))
    if flip:
        ts.append(RandomFlip(0.5, generator))
    if photometric:
        ts.append(PhotometricJitter(generator=generator))
    return Compose(ts)


def to_tensor(image: np.ndarray, label: np.ndarray | None, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(float32 [3,H,W] = (image/255 - mean)/std, int64 [H,W])``.

    ``mean``/``std`` are in the 0-1 range, or in 0-255 as mmseg configs write them (123.675, ...):
    a mean above 1 is taken as 0-255.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    if float(m.max()) <= 1.0:
        m, s = m * 255.0, s * 255.0
    x = (x - m) / s
    y = None if label is None else torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
    return x, y
