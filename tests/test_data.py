from __future__ import annotations

import lzma
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from advguard.data import (
    check_images,
    dataset_info,
    load_dataset,
    read_cifar_binary,
    read_idx,
    train_val_split,
)
from advguard.errors import DataError, InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_packaged_mnist_is_the_real_dataset():
    train = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) == 1.0
    assert torch.bincount(train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                                5851, 5949]
    assert torch.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]
    assert float(train.x.mean()) * 255 == pytest.approx(33.32, abs=0.01)


def test_mnist_from_a_folder_is_checksummed(tmp_path):
    src = Path(__import__("advguard.data", fromlist=["x"]).__file__).parent / "mnist"
    for f in src.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    assert len(load_dataset("mnist", "test", data_dir=tmp_path)) == 10000
    blob = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="MD5"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_missing_and_unknown_datasets_say_where_and_how(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match=f"CIFAR-10 not found.*{tmp_path}.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(DataError, match=f"mnist file .* not found in {tmp_path}"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="svhn not found"):
        load_dataset("svhn", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("mnist", "validation")


def test_dataset_names_are_normalised():
    assert dataset_info("CIFAR-10").name == "cifar10"
    assert dataset_info("fashion_mnist").name == "fashion-mnist"


def test_split_is_seeded_disjoint_and_complete():
    tr, va = train_val_split(1000, 100, seed=3)
    tr2, va2 = train_val_split(1000, 100, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 100 and len(tr) == 900
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(1000))
    assert not torch.equal(va, train_val_split(1000, 100, seed=4)[1])
    with pytest.raises(DataError):
        train_val_split(10, 10, seed=0)


def _cifar_records(n: int, seed: int, label_bytes: int = 1) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    rec = np.concatenate([np.zeros((n, label_bytes - 1), np.uint8), labels[:, None],
                          images.reshape(n, -1)], axis=1)
    return rec.tobytes(), images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_cifar10_binary_batches(tmp_path, compress):
    expected = []
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        blob, images, labels = _cifar_records(3, seed=i)
        expected.append((images, labels))
        if compress:
            (tmp_path / f"{name}.xz").write_bytes(lzma.compress(blob))
        else:
            (tmp_path / name).write_bytes(blob)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    want = np.concatenate([e[0] for e in expected[:5]])
    assert torch.equal(train.x, torch.tensor(want, dtype=torch.float32) / 255)
    assert test.y.tolist() == expected[5][1].tolist()


def test_truncated_cifar_batch_is_reported():
    with pytest.raises(DataError, match="truncated"):
        read_cifar_binary(b"\x00" * 3000)


@pytest.mark.skipif(not (SHARED / "cifar-10" / "test_batch.bin.xz").exists(),
                    reason="real CIFAR-10 copy not available")
def test_real_cifar10_test_batch():
    test = load_dataset("cifar10", "test", data_dir=SHARED / "cifar-10")
    assert test.x.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.y).tolist() == [1000] * 10


def test_idx_reader_checks_magic_and_size():
    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert read_idx(good).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="header says"):
        read_idx(good[:-1])


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar100_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for split, n in (("train", 4), ("test", 2)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        rows[split] = (data, fine)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setitem(CIFAR100.meta, "md5", _md5(folder / "meta"))
    train = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert train.x.shape == (4, 3, 32, 32) and train.info.num_classes == 100
    assert train.y.tolist() == rows["train"][1]
    want = torch.tensor(rows["train"][0].reshape(4, 3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(train.x, want)


def test_svhn_through_torchvision(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # SVHN's HWCN layout
    labels = np.array([[10], [1], [2], [3], [9]], dtype=np.uint8)  # '0' is stored as 10
    savemat(tmp_path / "test_32x32.mat", {"X": images, "y": labels})
    split_list = dict(SVHN.split_list)
    split_list["test"] = [split_list["test"][0], "test_32x32.mat",
                          _md5(tmp_path / "test_32x32.mat")]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    test = load_dataset("svhn", "test", data_dir=tmp_path)
    assert test.x.shape == (5, 3, 32, 32)
    assert test.y.tolist() == [0, 1, 2, 3, 9]
    assert torch.equal(test.x[2], torch.tensor(images[..., 2].transpose(2, 0, 1),
                                               dtype=torch.float32) / 255)


def test_fashion_mnist_through_torchvision(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for prefix, n in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        # torchvision's layout after a download: the IDX files, uncompressed, under raw/
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
        if prefix == "t10k":
            want_images, want_labels = images, labels
    test = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert test.x.shape == (3, 1, 28, 28)
    assert test.y.tolist() == want_labels.tolist()
    assert torch.equal(test.x[:, 0], torch.tensor(want_images, dtype=torch.float32) / 255)


@pytest.mark.parametrize("x, message", [
    (torch.rand(2, 1, 28, 28) * 2, "[0, 1]"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    (torch.zeros(2, 28, 28), "(N, C, H, W)"),
    (torch.zeros(2, 3, 28, 28), "3 channels"),
    (torch.zeros(2, 1, 32, 32), "32x32"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "floating point"),
    (np.zeros((2, 1, 28, 28)), "torch.Tensor"),
])
def test_check_images_names_the_problem(x, message):
    with pytest.raises(InputError, match=__import__("re").escape(message)):
        check_images(x, channels=1, size=(28, 28))
