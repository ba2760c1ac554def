"""A user's folder of images, streamed: torchvision's ImageFolder layout (one folder per class).

``ROOT/train/<class>/*.png|jpg…`` with optional ``ROOT/val/`` and ``ROOT/test/`` beside it, or
``ROOT/<class>/…`` alone, whose files are then split by a fixed seed (a share
:data:`TEST_SHARE` held out as test; without ``test/``, ``val/`` serves as test). Validation
images for choices (thresholds, strengths) come from ``val/`` or are held out of train by the
caller, never from test. Classes are the folder names, sorted (torchvision's ``find_classes``).

Each item is decoded when it is read (in DataLoader workers when asked), so memory does not grow
with the number of images. Images are grey or RGB (``channels``: from the first image unless
given); with ``image_size`` every image is resized (shorter side) and centre-cropped to a square
for evaluation, or random-resized-cropped and flipped for training with ``augment``; without it
every image must have the first image's size (a clear error names the first that does not).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from advguard.data.datasets import DatasetInfo, custom_info
from advguard.data.readers import Split
from advguard.errors import DataError

PREFIX = "imagefolder:"  # how a folder is named wherever a dataset name is taken
TEST_SHARE = 0.2  # of a folder without test/ (and val/): held out as test, by seed
STATS_SAMPLE = 500  # training images the per-channel mean and std are measured on
SIZE_CHECK = 1000  # image headers read up front to refuse mixed sizes early
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


def is_folder_source(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_root(name: str) -> Path:
    return Path(name[len(PREFIX):]).expanduser()


class FolderImages(Dataset):
    """The images of one split of a folder: ``(float32 (C, H, W) in [0, 1], label)``."""

    def __init__(self, samples: list[tuple[str, int]], info: DatasetInfo, *,
                 image_size: int | None, augment: bool = False) -> None:
        self.samples = samples
        self.info = info
        self.image_size = image_size
        self.augments = augment  # crops and flips of its own: the training loop adds none
        self._transform = _transform(info, image_size, augment)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = _decode(path, self.info.channels)
        if self.image_size is None and tuple(image.shape[1:]) != self.info.size:
            raise DataError(f"{path} is {image.shape[2]}x{image.shape[1]}, the folder's "
                            f"images are {self.info.size[1]}x{self.info.size[0]}: give "
                            "--image-size N to resize them all")
        return self._transform(image), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def load_folder(source: str | Path, split: str | Split = Split.TRAIN, *,
                image_size: int | None = None, channels: int | None = None,
                augment: bool = False, seed: int = 0, limit: int | None = None) -> FolderImages:
    """Split ``split`` (train, val or test) of the image folder ``source`` (a path, or
    ``imagefolder:PATH``)."""
    root = folder_root(str(source)) if is_folder_source(str(source)) else Path(source)
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise DataError(f"image size must be a positive number of pixels, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    split = str(getattr(split, "value", split))
    layout = _layout(root.resolve())
    if split not in layout:
        raise DataError(f"{root} has no {split!r} split" + (
            " (no val/ folder: hold validation images out of train)" if split == "val"
            else "; choose train, val or test"))
    info = folder_info(root.resolve(), image_size, channels)
    samples = layout[split]
    if limit is not None and limit < len(samples):  # a seeded sample of every class, in order
        rows = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        samples = [samples[int(i)] for i in rows[:limit].sort().values]
    return FolderImages(samples, info, image_size=image_size,
                        augment=augment and split == "train")


@functools.lru_cache(maxsize=8)
def _layout(root: Path) -> dict[str, list[tuple[str, int]]]:
    """The samples of every split: ``{"train": [(path, label)], "val": …, "test": …}``."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if (root / "train").is_dir():
        classes = _classes(root / "train")
        splits = {"train": _samples(root / "train", classes)}
        for name in ("val", "test"):
            if (root / name).is_dir():
                if _classes(root / name) != classes:
                    raise DataError(f"{root / name} has other class folders than "
                                    f"{root / 'train'}: {_classes(root / name)} vs {classes}")
                splits[name] = _samples(root / name, classes)
        if "test" not in splits:
            splits["test"] = splits.get("val") or _held_out(splits, 0)
        return splits
    classes = _classes(root)
    splits = {"train": _samples(root, classes)}
    _held_out(splits, 0)
    return splits


def _held_out(splits: dict[str, list[tuple[str, int]]], seed: int) -> list[tuple[str, int]]:
    """Move a seeded :data:`TEST_SHARE` of the training samples to ``splits["test"]``."""
    train = splits["train"]
    n_test = max(1, int(round(TEST_SHARE * len(train))))
    if n_test >= len(train):
        raise DataError(f"too few images ({len(train)}) to hold {TEST_SHARE:.0%} out as test")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    test_rows = sorted(perm[:n_test])
    keep = sorted(perm[n_test:])
    splits["test"] = [train[i] for i in test_rows]
    splits["train"] = [train[i] for i in keep]
    return splits["test"]


def _classes(folder: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder} holds no class folders (ImageFolder layout: one folder per "
                        "class, e.g. train/cat/1.png)") from None
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class folder ({', '.join(classes)}); "
                        "a classifier needs at least 2")
    return classes


def _samples(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        return make_dataset(str(folder), {c: i for i, c in enumerate(classes)},
                            extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:  # a class folder without one image
        raise DataError(f"{folder}: {str(exc).splitlines()[0]}") from None


@functools.lru_cache(maxsize=8)
def folder_info(root: Path, image_size: int | None, channels: int | None) -> DatasetInfo:
    """Classes, channels, size and the per-channel mean/std of a folder's training images."""
    layout = _layout(root)
    train = layout["train"]
    first = _decode(train[0][0], channels)
    c = first.shape[0] if channels is None else channels
    if image_size is None:
        size = tuple(first.shape[1:])
        _check_sizes(train, size)
    else:
        size = (image_size, image_size)
    classes = tuple(_classes(root / "train" if (root / "train").is_dir() else root))
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    transform = _transform(custom_info("tmp", channels=c, size=size, num_classes=2,  # type: ignore[arg-type]
                                       mean=(0.0,) * c, std=(1.0,) * c), image_size, False)
    sample = torch.stack([transform(_decode(train[int(i)][0], c))
                          for i in rows[:STATS_SAMPLE]])
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return custom_info(f"{PREFIX}{root}", channels=c, size=size,  # type: ignore[arg-type]
                       num_classes=len(classes), mean=tuple(round(m, 4) for m in mean),
                       std=tuple(round(s, 4) for s in std), classes=classes)


def _check_sizes(samples: list[tuple[str, int]], size: tuple[int, ...]) -> None:
    from PIL import Image

    for path, _ in samples[:SIZE_CHECK]:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path} is not a readable image: {exc}") from None
        if (h, w) != tuple(size):
            raise DataError(f"images of different sizes: {path} is {w}x{h}, {samples[0][0]} "
                            f"is {size[1]}x{size[0]}: give --image-size N to resize them all")


def _decode(path: str, channels: int | None) -> torch.Tensor:
    """One file as float32 (C, H, W) in [0, 1]: EXIF orientation applied, 16-bit grey scaled by
    1/65535, converted to grey (``channels`` 1) or RGB (3)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if channels is None:
                channels = 1 if img.mode in _GREY_MODES else 3
            if img.mode.startswith("I") and channels == 1:
                array = np.asarray(img, dtype=np.float32)
                scale = 65535.0 if img.mode != "I" or array.max() > 255 else 255.0
                return torch.from_numpy(array / scale).clamp_(0, 1).unsqueeze(0)
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path} is not a readable image ({str(exc).splitlines()[0]})") from None
    t = torch.from_numpy(array.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float().div_(255.0)


def _transform(info: DatasetInfo, image_size: int | None, augment: bool) -> Any:
    """Evaluation: resize the shorter side and centre-crop to ``image_size``; training with
    ``augment``: random-resized crop and flip (or, at the images' own size, a reflected-pad
    random crop of an eighth of the side and a flip)."""
    from torchvision.transforms import v2

    steps: list[Any] = []
    if augment:
        if image_size is None:
            pad = info.size[0] // 8
            steps.append(v2.RandomCrop(info.size, padding=pad, padding_mode="reflect"))
        else:
            steps.append(v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True))
        if info.flips:
            steps.append(v2.RandomHorizontalFlip())
    elif image_size is not None:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return _Clamped(v2.Compose(steps) if steps else None)


class _Clamped:
    """A transform whose result is clamped to [0, 1] (resampling overshoots); picklable for
    DataLoader workers."""

    def __init__(self, compose: Any) -> None:
        self.compose = compose

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.compose is None else self.compose(t).clamp_(0.0, 1.0)
