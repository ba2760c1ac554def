"""Data by name: a dataset advguard knows (``mnist``, ``cifar10``, …, held in memory) or a
user's image folder (``imagefolder:PATH``, streamed) — one function for both."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from advguard.data.datasets import DatasetInfo, dataset_info, load_dataset, train_val_split
from advguard.data.folder import PREFIX, folder_root, is_folder_source, load_folder
from advguard.data.loading import ImageDataset, subset
from advguard.data.readers import Split
from advguard.errors import DataError
from advguard.options import check_int, option


def load_data(source: str, split: str | Split = Split.TRAIN, *,
              data_dir: str | Path | None = None, image_size: int | None = None,
              channels: int | None = None, augment: bool = False, limit: int | None = None,
              download: bool = False) -> ImageDataset:
    """Split ``split`` of ``source``: a named dataset as an in-memory
    :class:`~advguard.data.ImageSet`, or ``imagefolder:PATH`` as a streamed
    :class:`~advguard.data.folder.FolderImages` (``image_size``, ``channels`` and ``augment``
    apply to folders)."""
    if is_folder_source(source):
        return load_folder(source, split, image_size=image_size, channels=channels,
                           augment=augment, limit=limit)
    if image_size is not None or channels is not None:
        raise DataError(f"{source} has a fixed image shape: --image-size and --channels are "
                        "for image folders (imagefolder:PATH)")
    return load_dataset(source, split, data_dir=data_dir, limit=limit, download=download)


def data_info(source: str, *, image_size: int | None = None,
              channels: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``source`` (a folder's is read from its training images)."""
    if is_folder_source(source):
        return load_folder(source, Split.TRAIN, image_size=image_size, channels=channels).info
    return dataset_info(source)


SPLITS = ("test", "val")
HOLD_OUT_SEED = 0  # one held-out split for every command: a checkpoint's is found again


@dataclass(frozen=True)
class DataOptions:
    """Where a command's images come from; every data option of the command line is a field
    here (defaults and help declared once). ``source`` left out: the checkpoint's data (or
    MNIST, for training)."""

    data: str | None = option(
        None, "a dataset name (mnist, fashion-mnist, cifar10, cifar100, svhn) or "
        "imagefolder:PATH (a folder of class folders; default: the checkpoint's, or mnist)",
        aliases=("--dataset",))
    data_dir: str | None = option(None, "folder holding a named dataset (MNIST: optional, a "
                                        "copy ships with advguard)")
    image_size: int | None = option(
        None, "image folders: resize and centre-crop (random-resized-crop with --augment) to "
        "N×N; default: the checkpoint's, or the images' own size")
    channels: int | None = option(None, "image folders: 1 (grey) or 3 (RGB); default: the "
                                        "checkpoint's, or the first image's")
    workers: int = option(0, "DataLoader worker processes that decode images")
    hold_out: int = option(0, "training images held out as a validation split (seeded): "
                              "train leaves them out, and checkpoints record it; evaluate "
                              "and audit attack them with --split val")
    split: str = option("test", "the images evaluate and audit attack: test, or val (the "
                                "training images held out with --hold-out, for choosing "
                                "recipes and strengths without seeing the test images)")

    def __post_init__(self) -> None:
        check_int("workers", self.workers, minimum=0)
        check_int("hold_out", self.hold_out, minimum=0)
        if self.split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.image_size is not None:
            check_int("image_size", self.image_size)

    @property
    def source(self) -> str:
        return self.data or "mnist"

    def with_checkpoint(self, meta: dict[str, Any]) -> DataOptions:
        """These options with what was left out taken from a checkpoint's metadata."""
        saved: dict[str, Any] = meta["data"] if isinstance(meta.get("data"), dict) else {}
        trained_on = saved.get("source") or meta.get("dataset")
        name = self.data or trained_on
        if not isinstance(name, str) or name == "custom":
            raise DataError("the checkpoint names no data it was trained on: give --data")
        if name != trained_on:  # other data: its own size and channels, unless given
            return replace(self, data=name)
        held = int(saved.get("hold_out") or 0)
        if self.hold_out and held and self.hold_out != held:
            raise DataError(f"the checkpoint was trained holding out {held} images; "
                            f"--hold-out {self.hold_out} would attack images it was trained on")
        return replace(self, data=name,
                       image_size=self.image_size or saved.get("image_size"),
                       channels=self.channels or saved.get("channels"),
                       hold_out=self.hold_out or held)

    def load(self, split: str | Split = Split.TRAIN, *, augment: bool = False,
             limit: int | None = None) -> ImageDataset:
        return load_data(self.source, split, data_dir=self.data_dir, image_size=self.image_size,
                         channels=self.channels, augment=augment, limit=limit)

    def held_out(self, *, augment: bool = False) -> tuple[ImageDataset, ImageDataset]:
        """``(training images, validation images)``: ``hold_out`` images of the training file
        set aside with a fixed seed, the same for every command."""
        full = self.load(Split.TRAIN, augment=augment)
        tr, va = train_val_split(len(full), self.hold_out, HOLD_OUT_SEED)
        return subset(full, tr), subset(full, va)

    def load_training(self, *, augment: bool = False, limit: int | None = None
                      ) -> ImageDataset:
        """The training images (less the held-out ones), the first ``limit`` of them."""
        if self.split != "test":
            raise DataError("--split chooses the images evaluate and audit attack; training "
                            "uses the training file less --hold-out")
        if not self.hold_out:
            return self.load(Split.TRAIN, augment=augment, limit=limit)
        train = self.held_out(augment=augment)[0]
        return train if limit is None else subset(train, range(min(limit, len(train))))

    def load_evaluation(self, limit: int | None = None, start: int = 0) -> ImageDataset:
        """The images ``--split`` names: the test file, or the held-out validation images —
        ``limit`` of them (default: all) from the ``start``-th on (a slice, so that a long
        evaluation can run as several)."""
        check_int("start", start, minimum=0)
        if self.split == "test":
            data = self.load(Split.TEST, limit=None if limit is None else start + limit)
        elif not self.hold_out:
            raise DataError("--split val needs the validation images held out of training "
                            "(train with --hold-out N; the checkpoint records it): without "
                            "them they would be images the model was trained on")
        else:
            data = self.held_out()[1]
        if start >= len(data):
            raise DataError(f"--test-start {start} is past the last of the {len(data)} "
                            f"{self.split} images")
        end = len(data) if limit is None else min(start + limit, len(data))
        return data if (start, end) == (0, len(data)) else subset(data, range(start, end))

    def info(self) -> DatasetInfo:
        return data_info(self.source, image_size=self.image_size, channels=self.channels)

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint records of its data (enough to load it again)."""
        source = self.source
        if is_folder_source(source):  # a path that still holds from another folder
            source = PREFIX + str(folder_root(source).resolve())
        return {"source": source, "image_size": self.image_size,
                "channels": self.channels, "hold_out": self.hold_out}
