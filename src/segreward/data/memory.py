"""A dataset held in memory as two tensors, for code that decodes its data once and trains many
times on it (a benchmark's protocol, a notebook):

    ds = InMemoryDataset.decode(CamVidDataset(root, "train", size=(96, 128)))   # one pass
    train(cfg, datasets={"train": ds, "val": {"val": ds_val}})

Items are ``(image float32 [3,H,W], label int64 [H,W])`` like every other dataset here; the
images are stored as given (already normalised). ``transform`` is a joint transform of
:mod:`segreward.data.transforms` (``RandomFlip``, ``RandomCrop``, ...); it gets the image as a
float ``[H,W,3]`` array in the stored (normalised) values, so a crop pads with 0, the mean colour.

``sample_seed`` (or :meth:`InMemoryDataset.seeded`) makes the augmentation of a sample a function
of ``(sample_seed, index, k)`` only, ``k`` counting this dataset object's earlier draws of that
index: the transform runs under a forked global torch RNG seeded from the three. Under the
trainer's batch order (every epoch a permutation, fixed by the run's seed) ``k`` is the epoch,
so two runs with the same seed see identical batches however much randomness their losses
draw (and the augmentation draws nothing from the training's RNG). A transform built with its
own ``generator=`` keeps using it; with DataLoader workers each worker counts its own draws.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from segreward.errors import SegrewardError


class InMemoryDataset(Dataset):
    """``images [N,3,H,W]`` float and ``labels [N,H,W]`` integer ids (``ignore_index`` = unlabelled).

    Args:
        classes: class names (their number is the number of classes).
        ignore_index: the label value of unlabelled pixels.
        transform: ``fn(image float [H,W,3], label int [H,W]) -> (image, label)`` on numpy.
        names: optional names of the samples (file stems), kept for reports.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], ignore_index: int = 255,
                 transform: Callable | None = None, names: Sequence[str] | None = None,
                 sample_seed: int | None = None):
        if images.dim() != 4 or images.shape[1] != 3 or labels.dim() != 3 or images.shape[0] != labels.shape[0] \
                or images.shape[2:] != labels.shape[1:]:
            raise SegrewardError(f"InMemoryDataset: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                                 "must be [N, 3, H, W] and [N, H, W] with the same N, H, W")
        if len(images) == 0:
            raise SegrewardError("InMemoryDataset: no samples")
        if names is not None and len(names) != len(images):
            raise SegrewardError(f"InMemoryDataset: {len(names)} names for {len(images)} samples")
        self.images, self.labels = images.float(), labels.long()
        self.classes, self.ignore_index = list(classes), int(ignore_index)
        self.meta = SimpleNamespace(classes=self.classes, ignore_index=self.ignore_index,
                                    num_classes=len(self.classes))
        self.transform = transform
        self.names = list(names) if names is not None else [str(i) for i in range(len(images))]
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        self._draws: dict[int, int] = {}

    @classmethod
    def decode(cls, dataset, transform: Callable | None = None, progress: bool = False) -> "InMemoryDataset":
        """Read every item of ``dataset`` once (its own transform, if any, applies once too)."""
        meta = getattr(dataset, "meta", None)
        classes = list(getattr(meta, "classes", None) or getattr(dataset, "classes", None) or [])
        if not classes:
            raise SegrewardError(f"InMemoryDataset.decode: {type(dataset).__name__} has no class names "
                                 "(.meta.classes or .classes); build InMemoryDataset(images, labels, classes) directly")
        ignore_index = int(getattr(meta, "ignore_index", getattr(dataset, "ignore_index", 255)))
        items = [dataset[i] for i in tqdm(range(len(dataset)), desc="decode", leave=False, disable=not progress)]
        images = torch.stack([x for x, _ in items])
        labels = torch.stack([y for _, y in items])
        return cls(images, labels, classes, ignore_index, transform, getattr(dataset, "names", None))

    def subset(self, index, transform: Callable | None = None) -> "InMemoryDataset":
        """The samples at ``index`` (a slice, list or tensor of positions) as a new dataset sharing no
        transform with this one."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        return InMemoryDataset(self.images[idx], self.labels[idx], self.classes, self.ignore_index, transform,
                               [self.names[int(i)] for i in idx])

    def with_transform(self, transform: Callable | None) -> "InMemoryDataset":
        """The same tensors (not copied) with another transform (and the same ``sample_seed``)."""
        return InMemoryDataset(self.images, self.labels, self.classes, self.ignore_index, transform, self.names,
                               self.sample_seed)

    def seeded(self, seed: int | None) -> "InMemoryDataset":
        """The same tensors and transform, augmented per sample from ``seed`` (None: global RNG)."""
        return InMemoryDataset(self.images, self.labels, self.classes, self.ignore_index, self.transform, self.names,
                               seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[i], self.labels[i]
        if self.transform is None:
            return x, y
        if self.sample_seed is None:
            image, label = self.transform(x.permute(1, 2, 0).numpy(), y.numpy())
        else:
            k = self._draws.get(i, 0)
            self._draws[i] = k + 1
            seed = int(np.random.SeedSequence([self.sample_seed, int(i), k]).generate_state(1, np.uint64)[0])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, label = self.transform(x.permute(1, 2, 0).numpy(), y.numpy())
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous()
        return image, torch.from_numpy(np.ascontiguousarray(label)).long()


__all__ = ["InMemoryDataset"]
