"""Named datasets as in-memory tensors: float32 NCHW in [0, 1] and int64 labels.

An :class:`ImageSet` is a map-style :class:`torch.utils.data.Dataset` like any other (it yields
``(image, label)``); it is the fast path for sets that fit in memory, and fetches a whole batch
at once (``__getitems__``), so the training loop and every streamed pass read it through the
same :func:`advguard.data.loading.batches` as a folder of images.

* ``mnist`` ships inside the package (the four original IDX files, MD5-checked at load), so the
  main job runs offline; ``fashion-mnist`` (the same format) is read by the same IDX reader from
  a folder of the four files (``.gz`` or extracted) or torchvision's layout.
* ``cifar10`` is read from a folder of the official binary batches (``data_batch_1.bin`` …
  ``test_batch.bin``, plain or ``.xz``) or through torchvision's python layout.
* ``cifar100`` and ``svhn`` are read through torchvision from ``data_dir``
  (``download=True`` fetches them when online).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from advguard.data.readers import (
    IDX_DATASETS,
    Split,
    load_cifar10,
    load_idx_dataset,
    load_torchvision,
)
from advguard.errors import DataError
from advguard.options import check_int


@dataclass(frozen=True)
class DatasetInfo:
    """Every per-dataset fact in one place: shape, classes, normalisation, the papers'
    architectures for it (SPEC A2), its default strength grid and detection strength."""

    name: str
    channels: int
    size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crafter: str  # architecture of the crafting model (transfer setting)
    victim: str  # architecture of the victim models
    grid: tuple[float, ...]  # the paper's test strengths, also the selection's candidates
    detect_eps: float  # FGSM/PGD strength of the detection experiment
    unit: float  # strengths are shown as multiples of 1/unit (1: pixel units, 255: /255)
    flips: bool = False  # a left-right mirror keeps the label (natural images, not digits)
    classes: tuple[str, ...] = ()  # class names, where the data has them (folder names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, *self.size)


def custom_info(name: str, *, channels: int, size: tuple[int, int], num_classes: int,
                mean: tuple[float, ...], std: tuple[float, ...],
                classes: tuple[str, ...] = ()) -> DatasetInfo:
    """The facts of a user's dataset: natural images, strengths in /255 units (the grid
    0, 1/255, …, 8/255 and detection at 8/255, the field's usual L∞ budget), left-right flips
    allowed, ``resnet-s`` as the victim and crafting architecture."""
    return DatasetInfo(name, channels, tuple(size), num_classes, tuple(mean),  # type: ignore[arg-type]
                       tuple(std), **_CUSTOM, flips=True, classes=tuple(classes))


@dataclass
class ImageSet(Dataset):
    """Images ``x`` (N, C, H, W) float32 in [0, 1] and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by one tensor index (the in-memory fast path)."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return self.x[rows], self.y[rows]

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        return ImageSet(self.x[index], self.y[index], self.info)


def strength_grid(stop: float, step: float, start: float = 0.0) -> list[float]:
    """``start, start + step, …, stop`` with float noise rounded off (e.g. 0, 0.03, …, 0.3)."""
    n = int(round((stop - start) / step))
    return [round(start + i * step, 10) for i in range(n + 1)]


# The MAT paper's grids: MNIST ε ∈ [0, 0.3] step 0.03; CIFAR/SVHN ε ∈ [0, 5] step 0.5 in
# 0-255 units. Detection: ε = 0.2 on MNIST-like data, 8/255 on colour images.
_GREY: dict[str, Any] = {"grid": tuple(strength_grid(0.3, 0.03)), "detect_eps": 0.2,
                         "unit": 1.0, "crafter": "lenet5", "victim": "mlp3"}
_RGB: dict[str, Any] = {"grid": tuple(strength_grid(5 / 255, 0.5 / 255)), "detect_eps": 8 / 255,
                        "unit": 255.0, "crafter": "cifar-crafter", "victim": "cifar-victim"}

_CUSTOM: dict[str, Any] = {"grid": tuple(strength_grid(8 / 255, 1 / 255)), "detect_eps": 8 / 255,
                           "unit": 255.0, "crafter": "resnet-s", "victim": "resnet-s"}

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), **_GREY),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, (28, 28), 10, (0.2860,), (0.3530,),
                                 **_GREY),
    "cifar10": DatasetInfo("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), **_RGB, flips=True),
    "cifar100": DatasetInfo("cifar100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), **_RGB, flips=True),
    "svhn": DatasetInfo("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970), **{**_RGB, "victim": "svhn-victim"}),
}

def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name; unknown names raise :class:`DataError`."""
    key = name.lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist"}.get(
        key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(name: str, split: str | Split = Split.TRAIN, *, data_dir: str | Path | None = None,
                 download: bool = False, limit: int | None = None) -> ImageSet:
    """Load ``split`` of dataset ``name`` as an :class:`ImageSet` (optionally the first ``limit``).

    ``data_dir`` defaults to ``$ADVGUARD_DATA_DIR`` or ``./data``; MNIST needs none.
    """
    info = dataset_info(name)
    if limit is not None:
        check_int("limit", limit)
    try:
        split = Split(split)
    except ValueError:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'") from None
    root = Path(data_dir) if data_dir is not None else Path(os.environ.get("ADVGUARD_DATA_DIR",
                                                                           "data"))
    if info.name in IDX_DATASETS:
        packaged = info.name == "mnist" and data_dir is None
        images, labels = load_idx_dataset(info.name, split, None if packaged else root, download)
    elif info.name == "cifar10":
        images, labels = load_cifar10(split, root, download)
    else:
        images, labels = load_torchvision(info.name, split, root, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.tensor(np.ascontiguousarray(images), dtype=torch.float32).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    y = torch.tensor(np.asarray(labels), dtype=torch.int64)
    return ImageSet(x, y, info)


VAL_SIZE = 5000  # validation images held out of a training split (calibration, selection)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint ``(train_index, val_index)`` over ``range(n)``; ``val_size`` may be 0."""
    if not 0 <= val_size < n:
        raise DataError(f"validation size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


