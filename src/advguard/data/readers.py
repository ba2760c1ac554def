"""Readers of the datasets' file formats: IDX (MNIST, Fashion-MNIST), CIFAR binary batches, and
torchvision's layouts for the rest. Each returns ``(uint8 images (N[, C], H, W), labels)``."""

from __future__ import annotations

import gzip
import hashlib
import lzma
from enum import Enum
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from advguard.errors import DataError


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"


# MD5 of the original download files (the values torchvision's MNIST class lists).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

CIFAR10_BIN = {Split.TRAIN: [f"data_batch_{i}.bin" for i in range(1, 6)],
               Split.TEST: ["test_batch.bin"]}


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


IDX_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # name -> torchvision folder


def load_idx_dataset(name: str, split: Split, folder: Path | None,
                     download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-format dataset from ``folder``: the four original IDX files, ``.gz`` or
    extracted, in the folder itself or in torchvision's ``<Name>/raw``; ``folder=None`` reads
    the MNIST copy shipped with advguard. The original MNIST ``.gz`` files are MD5-checked."""
    prefix = "train" if split is Split.TRAIN else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if folder is not None and download and _find_idx(folder, name, stems[0]) is None:
        _torchvision_download(name, folder)
    arrays = []
    for stem in stems:
        if folder is None:
            blob = resources.files("advguard.data").joinpath("mnist").joinpath(
                f"{stem}.gz").read_bytes()
            where, gz = f"the packaged copy ({stem}.gz)", True
        else:
            path = _find_idx(folder, name, stem)
            if path is None:
                raise DataError(
                    f"{name} file {stem}(.gz) not found in {folder} or "
                    f"{folder / IDX_DATASETS[name] / 'raw'}; copy the four IDX files there"
                    + (", or omit --data-dir to use the copy shipped with advguard"
                       if name == "mnist" else ", or pass --download when online"))
            blob, where, gz = path.read_bytes(), str(path), path.suffix == ".gz"
        if gz and name == "mnist" and hashlib.md5(blob).hexdigest() != MNIST_FILES[f"{stem}.gz"]:
            raise DataError(f"MNIST file {where} does not match its MD5 checksum; "
                            "it is corrupt or not the original file")
        try:
            arrays.append(read_idx(gzip.decompress(blob) if gz else blob))
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot decompress {where}: {exc}") from None
    if len(arrays[0]) != len(arrays[1]):
        raise DataError(f"{name} {split.value}: {len(arrays[0])} images but {len(arrays[1])} "
                        "labels")
    return arrays[0], arrays[1]


def _find_idx(folder: Path, name: str, stem: str) -> Path | None:
    for base in (folder, folder / IDX_DATASETS[name] / "raw"):
        for candidate in (base / f"{stem}.gz", base / stem):
            if candidate.is_file():
                return candidate
    return None


def _torchvision_download(name: str, root: Path) -> None:
    from torchvision import datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        cls(str(root), train=True, download=True)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"could not download {name} into {root}: "
                        f"{str(exc).splitlines()[0]}") from None


def read_cifar_binary(data: bytes, label_bytes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR binary records: ``label_bytes`` label byte(s), then 3072 CHW pixels."""
    rec = 3072 + label_bytes
    if len(data) % rec:
        raise DataError(f"CIFAR binary batch of {len(data)} bytes is not a whole number of "
                        f"{rec}-byte records (truncated?)")
    arr = np.frombuffer(data, np.uint8).reshape(-1, rec)
    return arr[:, label_bytes:].reshape(-1, 3, 32, 32), arr[:, label_bytes - 1].astype(np.int64)


def load_cifar10(split: Split, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10"):
        files = [_binary_batch(folder, name) for name in CIFAR10_BIN[split]]
        if all(files):
            parts = [read_cifar_binary(_read_maybe_xz(f)) for f in files]  # type: ignore[arg-type]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if download or (root / "cifar-10-batches-py").is_dir():
        return load_torchvision("cifar10", split, root, download)
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


def load_torchvision(name: str, split: Split, root: Path,
                      download: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets as tvd

    train = split is Split.TRAIN
    try:
        if name == "svhn":
            ds = tvd.SVHN(str(root), split=split.value, download=download)
            return ds.data, np.asarray(ds.labels)  # data is already (N, 3, 32, 32)
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
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
