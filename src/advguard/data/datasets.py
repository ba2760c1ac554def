"""Datasets as in-memory tensors: float32 NCHW in [0, 1] and int64 labels.

* ``mnist`` ships inside the package (the four original IDX files, MD5-checked at load), so the
  main job runs offline.
* ``cifar10`` is read from a folder of the official binary batches (``data_batch_1.bin`` …
  ``test_batch.bin``, plain or ``.xz``) or through torchvision's python layout.
* ``cifar100``, ``svhn`` and ``fashion-mnist`` are read through torchvision from ``data_dir``
  (``download=True`` fetches them when online).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from advguard.errors import DataError


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shape, classes and normalisation."""

    name: str
    channels: int
    size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class ImageSet:
    """Images ``x`` (N, C, H, W) float32 in [0, 1] and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        return ImageSet(self.x[index], self.y[index], self.info)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, (28, 28), 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970)),
}

# MD5 of the original download files (the values torchvision's MNIST class lists).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

CIFAR10_BIN = {Split.TRAIN: [f"data_batch_{i}.bin" for i in range(1, 6)],
               Split.TEST: ["test_batch.bin"]}


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
    try:
        split = Split(split)
    except ValueError:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'") from None
    root = Path(data_dir) if data_dir is not None else Path(os.environ.get("ADVGUARD_DATA_DIR",
                                                                           "data"))
    if info.name == "mnist":
        images, labels = _load_mnist(split, None if data_dir is None else root)
    elif info.name == "cifar10":
        images, labels = _load_cifar10(split, root, download)
    else:
        images, labels = _load_torchvision(info.name, split, root, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.tensor(np.ascontiguousarray(images), dtype=torch.float32).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    y = torch.tensor(np.asarray(labels), dtype=torch.int64)
    return ImageSet(x, y, info)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint ``(train_index, val_index)`` over ``range(n)``; ``val_size`` may be 0."""
    if not 0 <= val_size < n:
        raise DataError(f"validation size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --- readers -------------------------------------------------------------------------------

def read_idx(data: bytes) -> np.ndarray:
    """Parse an uncompressed IDX file (MNIST format): uint8 array of the header's shape."""
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an IDX uint8 file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"IDX file holds {len(data) - offset} bytes, header says {count}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _load_mnist(split: Split, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split is Split.TRAIN else "t10k"
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    arrays = []
    for fname in names:
        if folder is None:
            blob = resources.files("advguard.data").joinpath("mnist").joinpath(fname).read_bytes()
            where = f"the packaged copy ({fname})"
        else:
            path = _find_file(folder, [fname, f"MNIST/raw/{fname}"], "mnist",
                              "copy the four IDX .gz files there, or omit --data-dir to use "
                              "the copy shipped with advguard")
            blob, where = path.read_bytes(), str(path)
        if hashlib.md5(blob).hexdigest() != MNIST_FILES[fname]:
            raise DataError(f"MNIST file {where} does not match its MD5 checksum; "
                            "it is corrupt or not the original file")
        arrays.append(read_idx(gzip.decompress(blob)))
    return arrays[0], arrays[1]


def read_cifar_binary(data: bytes, label_bytes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR binary records: ``label_bytes`` label byte(s), then 3072 CHW pixels."""
    rec = 3072 + label_bytes
    if len(data) % rec:
        raise DataError(f"CIFAR binary batch of {len(data)} bytes is not a whole number of "
                        f"{rec}-byte records (truncated?)")
    arr = np.frombuffer(data, np.uint8).reshape(-1, rec)
    return arr[:, label_bytes:].reshape(-1, 3, 32, 32), arr[:, label_bytes - 1].astype(np.int64)


def _load_cifar10(split: Split, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10"):
        files = [_binary_batch(folder, name) for name in CIFAR10_BIN[split]]
        if all(files):
            parts = [read_cifar_binary(_read_maybe_xz(f)) for f in files]  # type: ignore[arg-type]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if download or (root / "cifar-10-batches-py").is_dir():
        return _load_torchvision("cifar10", split, root, download)
    raise DataError(
        f"CIFAR-10 not found: looked for {', '.join(CIFAR10_BIN[split])} (.bin or .bin.xz) in "
        f"{root}, {root / 'cifar-10-batches-bin'}, {root / 'cifar-10'} and for torchvision's "
        f"{root / 'cifar-10-batches-py'}; pass --data-dir DIR, or --download when online")


def _binary_batch(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.xz"):
        if candidate.is_file():
            return candidate
    return None


def _read_maybe_xz(path: Path) -> bytes:
    try:
        return lzma.open(path).read() if path.suffix == ".xz" else path.read_bytes()
    except lzma.LZMAError as exc:
        raise DataError(f"cannot decompress {path}: {exc}") from None


def _find_file(folder: Path, candidates: list[str], dataset: str, hint: str) -> Path:
    for rel in candidates:
        if (folder / rel).is_file():
            return folder / rel
    raise DataError(f"{dataset} file {candidates[0]} not found in {folder}; {hint}")


def _load_torchvision(name: str, split: Split, root: Path,
                      download: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets as tvd

    train = split is Split.TRAIN
    try:
        if name == "svhn":
            ds = tvd.SVHN(str(root), split=split.value, download=download)
            return ds.data, np.asarray(ds.labels)  # data is already (N, 3, 32, 32)
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
               "fashion-mnist": tvd.FashionMNIST}[name]
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataError(f"{name} not found in {root} ({str(exc).splitlines()[0]}); pass "
                        f"--data-dir DIR holding torchvision's layout, or --download when "
                        "online") from None
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    if data.ndim == 4:  # CIFAR python layout is NHWC
        data = data.transpose(0, 3, 1, 2)
    targets = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets
    return data, np.asarray(targets)
