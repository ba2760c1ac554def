"""A user's folder of images (ImageFolder layout, real PNG/JPEG files written here from real
MNIST and CIFAR-10 images): read right, streamed through training, detection and the CLI
exactly as the in-memory path, and refused in one clear line when it is malformed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image
from torch.utils.data import DataLoader

from advguard.data import (
    ImageSet,
    batches,
    load_data,
    load_dataset,
    load_folder,
    materialise,
    with_info,
)
from advguard.detection import KNNDetector
from advguard.errors import DataError
from advguard.models import build_model, load_model
from advguard.training import StrengthMix, TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_folder(root: Path, data: ImageSet, split: str | None, fmt: str = "png") -> Path:
    """``data`` as image files in ImageFolder layout (``root/split/<class>/<row>.fmt``)."""
    base = root / split if split else root
    for i in range(len(data)):
        folder = base / f"class_{int(data.y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.x[i] * 255).round().byte().permute(1, 2, 0).squeeze(2).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.{fmt}", quality=95)
    return root


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> tuple[Path, ImageSet, ImageSet]:
    root = tmp_path_factory.mktemp("cifar")
    train = load_dataset("cifar10", "train", data_dir=SHARED / "cifar-10", limit=300)
    test = load_dataset("cifar10", "test", data_dir=SHARED / "cifar-10", limit=100)
    write_folder(root, train, "train")
    write_folder(root, test, "test")
    return root, train, test


def _class_major(data: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``data`` in ImageFolder's order: by class folder name, then file name (the row)."""
    order = sorted(range(len(data)), key=lambda i: (f"class_{int(data.y[i])}", i))
    return data.x[order], data.y[order]


def test_a_png_folder_reads_the_same_pixels_as_the_dataset(cifar_folder):
    root, train, _ = cifar_folder
    folder = load_folder(root, "train")
    assert folder.info.shape == (3, 32, 32) and folder.info.num_classes == 10
    assert folder.info.classes[0] == "class_0"
    x, y = _class_major(train)
    stacked = materialise(folder)
    assert torch.equal(stacked.x, x) and torch.equal(stacked.y, y)
    assert load_data(f"imagefolder:{root}", "test").info.num_classes == 10


@pytest.mark.parametrize("workers", [0, 2])
def test_training_streamed_from_a_folder_equals_training_in_memory(cifar_folder, workers):
    root, _, _ = cifar_folder
    folder = load_folder(root, "train")
    memory = materialise(folder)
    config = TrainConfig(epochs=2, batch_size=50, device="cpu", seed=3)
    models = []
    for data in (memory, folder):
        torch.manual_seed(0)
        model = build_model("cifar-victim", folder.info)
        result = train(model, data, StrengthMix((4 / 255,)), None, config, progress=False,
                       workers=workers)
        models.append((model, result))
    (a, ra), (b, rb) = models
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history],
                                                            rel=1e-5)


def test_a_detector_bank_fitted_streamed_equals_one_fitted_in_memory(cifar_folder):
    root, _, test = cifar_folder
    folder = load_folder(root, "train")
    memory = materialise(folder)
    torch.manual_seed(0)
    model = build_model("resnet-s", folder.info).eval()
    streamed = KNNDetector(k=20, preprocessing="l2", chunk_size=64, batch_size=32).fit(
        model, DataLoader(folder, num_workers=2))
    in_memory = KNNDetector(k=20, preprocessing="l2").fit(model, memory.x, memory.y)
    np.testing.assert_allclose(streamed.score_samples(test.x), in_memory.score_samples(test.x),
                               rtol=1e-5, atol=1e-6)
    predicted, scores, labels = streamed.inspect_dataset(load_folder(root, "test"))
    assert len(predicted) == len(scores) == len(labels) == 100


def test_grey_jpegs_without_test_folder_are_split_by_seed(tmp_path):
    digits = load_dataset("mnist", "test", limit=50)
    write_folder(tmp_path, digits, None, fmt="jpg")
    train, test = load_folder(tmp_path, "train"), load_folder(tmp_path, "test")
    assert train.info.channels == 1 and train.info.size == (28, 28)
    assert len(train) + len(test) == 50 and len(test) == 10
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    x, _, _ = next(iter(batches(test, batch_size=10)))
    assert x.shape == (10, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_image_size_resizes_every_image_and_augment_crops_train_only(cifar_folder):
    root, _, _ = cifar_folder
    train = load_folder(root, "train", image_size=48, augment=True)
    test = load_folder(root, "test", image_size=48, augment=True)
    assert train.augments and not test.augments
    assert train[0][0].shape == test[0][0].shape == (3, 48, 48)


def test_any_torch_dataset_trains_with_info_from_its_first_item(mnist_train):
    class Plain(torch.utils.data.Dataset):
        classes = [str(c) for c in range(10)]

        def __len__(self) -> int:
            return 200

        def __getitem__(self, i: int):
            return mnist_train.x[i], int(mnist_train.y[i])

    data = with_info(Plain())
    model = build_model("lenet5", data.info)
    train(model, DataLoader(data, batch_size=7), config=TrainConfig(epochs=1, device="cpu"),
          progress=False)
    assert data.info.shape == (1, 28, 28) and data.info.num_classes == 10


def _bad_folder(root: Path, kind: str) -> Path:
    digits = load_dataset("mnist", "test", limit=30)
    write_folder(root, digits, "train")
    first = sorted((root / "train").iterdir())[0]
    if kind == "one-class":
        for extra in sorted((root / "train").iterdir())[1:]:
            for f in extra.iterdir():
                f.unlink()
            extra.rmdir()
    elif kind == "empty-class":
        (root / "train" / "class_empty").mkdir()
    elif kind == "corrupt-image":
        (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif kind == "mixed-sizes":
        Image.new("L", (40, 30)).save(first / "big.png")
    return root


def test_a_corrupt_image_read_by_a_worker_is_one_clear_line(tmp_path):
    root = _bad_folder(tmp_path / "f", "none")
    folder = load_folder(root, "train")
    Path(folder.samples[3][0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as caught:
        list(batches(folder, batch_size=4, workers=2))
    assert "\n" not in str(caught.value) and "is not a readable image" in str(caught.value)


@pytest.mark.parametrize(("kind", "needle"), [
    ("one-class", "a classifier needs at least 2"),
    ("empty-class", "Found no valid file for the classes class_empty"),
    ("corrupt-image", "broken.png is not a readable image"),
    ("mixed-sizes", "images of different sizes"),
    ("missing", "image folder not found"),
])
def test_a_malformed_folder_is_refused_in_one_line(kind, needle, tmp_path, cli):
    root = tmp_path / "missing" if kind == "missing" else _bad_folder(tmp_path / "f", kind)
    result = cli("train", str(tmp_path / "m.safetensors"), "--data", f"imagefolder:{root}",
                 "--model", "lenet5", "--epochs", "1", "-q")
    assert_one_line_error(result, needle)


def test_non_image_files_are_skipped_and_mixed_sizes_train_with_image_size(tmp_path, cli):
    root = _bad_folder(tmp_path / "f", "mixed-sizes")
    (root / "train" / "class_0" / "notes.txt").write_text("not an image")
    out = tmp_path / "m.safetensors"
    result = cli("train", str(out), "--data", f"imagefolder:{root}", "--image-size", "28",
                 "--model", "lenet5", "--epochs", "1", "-q")
    assert result.returncode == 0, result.stderr
    model, meta = load_model(out)
    assert meta["data"]["image_size"] == 28 and meta["model"]["size"] == [28, 28]
    with pytest.raises(DataError, match="no 'val' split"):
        load_folder(root, "val")


def test_batches_read_in_order_hold_a_bounded_number_of_pixels():
    """Inference batches of 224×224 RGB images are cut to what 128 MiB of float32 holds (222
    images), so a feature extraction's activations do not grow with the default batch of
    1,000; small images keep the batch asked for."""
    from torch.utils.data import Dataset

    from advguard.data import batches, with_info
    from advguard.data.loading import BATCH_VALUES

    class Blank(Dataset):
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

        def __len__(self) -> int:
            return 500

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(self.shape), i % 2

    big = [len(x) for x, _, _ in batches(with_info(Blank((3, 224, 224)), 2), batch_size=1000)]
    assert big == [222, 222, 56] and 222 * 3 * 224 * 224 <= BATCH_VALUES
    small = [len(x) for x, _, _ in batches(with_info(Blank((1, 28, 28)), 2), batch_size=1000)]
    assert small == [500]


def test_transfer_directions_of_a_folder_live_on_disk(cifar_folder, tmp_path, cli):
    """The transfer setting on an image folder: the crafting model's FGSM directions are
    written batch by batch to an int8 file and read back memory-mapped — equal to the
    directions crafted in memory — and ``train --crafter`` trains from the folder with them,
    then removes the file; with --augment (crops drawn as the folder is read) it refuses."""
    from advguard.attacks import fgsm_directions, fgsm_directions_file
    from advguard.models import save_model

    root, _, _ = cifar_folder
    folder = load_folder(root, "train")
    memory = materialise(folder)
    torch.manual_seed(0)
    crafter = build_model("cifar-crafter", folder.info).eval()
    on_disk = fgsm_directions_file(crafter, folder, tmp_path / "d.npy", batch_size=64,
                                   workers=2)
    assert on_disk.dtype == torch.int8 and not (tmp_path / "d.npy.tmp").exists()
    assert np.load(tmp_path / "d.npy", mmap_mode="r").shape == (300, 3, 32, 32)
    assert torch.equal(on_disk, fgsm_directions(crafter, memory.x, memory.y))
    crafter_file = save_model(tmp_path / "crafter.safetensors", crafter, arch="cifar-crafter",
                              dataset="cifar10")
    out = tmp_path / "transfer.safetensors"
    args = ["train", str(out), "--data", f"imagefolder:{root}", "--model", "cifar-victim",
            "--crafter", str(crafter_file), "--strengths", "4/255,8/255", "--epochs", "1", "-q"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert load_model(out)[1]["history"][0]["epoch"] == 1
    assert not list(tmp_path.glob("transfer.directions*"))
    assert_one_line_error(cli(*args, "--augment"), "trains without --augment")


def test_a_saved_array_is_read_back_memory_mapped_and_a_truncated_one_is_refused(tmp_path):
    from advguard.errors import CheckpointError
    from advguard.io import load_array, save_array

    d = torch.randint(-1, 2, (50, 3, 8, 8), dtype=torch.int8)
    path = save_array(tmp_path / "d.npy", d)
    back = load_array(path)
    assert torch.equal(back, d) and back.dtype == torch.int8
    back[0] = 0  # copy-on-write: the file keeps its values
    assert torch.equal(load_array(path), d)
    (tmp_path / "bad.npy").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated array"):
        load_array(tmp_path / "bad.npy")
