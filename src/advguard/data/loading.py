"""One way to read any image dataset in batches: a map-style :class:`~torch.utils.data.Dataset`
of ``(image, label)`` (an in-memory :class:`~advguard.data.ImageSet`, a folder of images, a
user's own), or a :class:`~torch.utils.data.DataLoader` over one.

:func:`batches` walks given rows of a dataset through a ``DataLoader`` (worker processes decode
while the model trains) and yields ``(images, labels, rows)``: images float32 ``(B, C, H, W)``
in [0, 1], labels int64 ``(B,)`` and the dataset rows they came from (per-row data such as the
transfer setting's directions follows them). A dataset that fetches a whole batch at once
(``__getitems__``, as :class:`~advguard.data.ImageSet` does) is read that way: the in-memory
fast path is the same code path.

Peak memory depends on the batch size and the number of workers, never on the dataset's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from advguard.data.datasets import DatasetInfo, ImageSet
from advguard.errors import AdvguardError, DataError, InputError

MATERIALISE_BYTES = 4 * 2**30  # the most a slice read into memory (for attacks) may take
BATCH_VALUES = 2**25  # pixel values of one batch read in order at most (128 MiB as float32)


class ImageDataset(Protocol):
    """What advguard reads data through: a map-style dataset of ``(image, label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> Any: ...


def as_dataset(data: Any) -> tuple[ImageDataset, int]:
    """``(map-style dataset, worker processes)`` of a Dataset or a DataLoader (whose dataset
    and ``num_workers`` are taken; its own order and batch size are not: each entry point
    decides those)."""
    if isinstance(data, DataLoader):
        return _check_map_style(data.dataset), int(data.num_workers)
    return _check_map_style(data), 0


def _check_map_style(data: Any) -> ImageDataset:
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise InputError(f"data must be a map-style torch Dataset of (image, label) or a "
                         f"DataLoader over one, got {type(data).__name__}")
    if len(data) == 0:
        raise InputError("the dataset is empty")
    return data


def info_of(data: Any) -> DatasetInfo | None:
    """The :class:`DatasetInfo` a dataset carries (``data.info``, through subsets), if any."""
    while isinstance(data, (Subset, DataLoader)):
        data = data.dataset
    info = getattr(data, "info", None)
    return info if isinstance(info, DatasetInfo) else None


def subset(data: ImageDataset, rows: torch.Tensor | Sequence[int]) -> ImageDataset:
    """The rows ``rows`` of ``data``: an :class:`ImageSet` stays one (tensors indexed), any
    other dataset becomes a :class:`~torch.utils.data.Subset` (nothing is read)."""
    if isinstance(data, ImageSet):
        return data.subset(torch.as_tensor(rows, dtype=torch.long))
    return _InfoSubset(data, [int(i) for i in rows])  # type: ignore[arg-type]


class _InfoSubset(Subset):
    """A Subset that keeps its dataset's ``info`` and says whether it augments itself."""

    @property
    def info(self) -> DatasetInfo | None:
        return info_of(self.dataset)

    @property
    def augments(self) -> bool:
        return bool(getattr(self.dataset, "augments", False))


def as_image(image: Any, where: str) -> torch.Tensor:
    """One dataset item's image as float32 (C, H, W) in [0, 1]: tensors (float, or uint8 /255)
    and PIL images are taken; anything else is an error naming the item."""
    if not isinstance(image, torch.Tensor):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None  # type: ignore[assignment]
        if Image is not None and isinstance(image, Image.Image):
            import torchvision.transforms.functional as TF

            image = TF.pil_to_tensor(image)
        elif isinstance(image, np.ndarray):  # NumPy's layout is PIL's: (H, W) or (H, W, C)
            array = np.ascontiguousarray(image)
            image = torch.from_numpy(array if array.ndim == 2 else array.transpose(2, 0, 1).copy())
        else:
            raise InputError(f"{where}: an image must be a tensor (C, H, W) in [0, 1] or a PIL "
                             f"image, got {type(image).__name__}")
    if image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    elif image.dtype != torch.float32:
        image = image.float()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3:
        raise InputError(f"{where}: an image must have shape (C, H, W), got "
                         f"{tuple(image.shape)}")
    return image


class _Rows(Dataset):
    """``dataset`` read a batch of rows at a time: ``(images, labels, rows)``."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])

    def __getitems__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fetch = getattr(self.dataset, "__getitems__", None)
        if isinstance(self.dataset, ImageSet) and fetch is not None:
            x, y = fetch(rows)
        else:
            items = [self.dataset[i] for i in rows]
            images = [as_image(item[0], f"dataset item {i}") for i, item in zip(rows, items,
                                                                               strict=True)]
            shapes = {tuple(t.shape) for t in images}
            if len(shapes) > 1:
                a, b = sorted(shapes)[:2]
                raise DataError(
                    f"images of different sizes in one batch ({'x'.join(map(str, a))} and "
                    f"{'x'.join(map(str, b))}): give an image size (--image-size N) or resize "
                    "them in the dataset's transform")
            x = torch.stack(images)
            y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
        return x, y, torch.as_tensor(rows, dtype=torch.long)


def fitting_batch(data: Any, batch_size: int) -> int:
    """``batch_size``, made smaller for large images so that one batch holds at most
    :data:`BATCH_VALUES` pixel values (1,000 MNIST or CIFAR-10 images, 222 at 224×224×3): the
    batches read in order feed inference, whose activations grow with the batch's pixels."""
    info = info_of(data)
    if info is None:
        return batch_size
    return max(1, min(batch_size, BATCH_VALUES // int(np.prod(info.shape))))


def _as_batch(batch: Any) -> Any:
    return batch


def batches(data: ImageDataset, rows: Sequence[torch.Tensor] | None = None, *,
            batch_size: int = 1000, workers: int = 0, pin_memory: bool = False,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images, labels, rows)`` for each batch of dataset rows in ``rows`` (a sequence of
    index tensors), or for ``range(len(data))`` in order, ``batch_size`` at a time (fewer for
    large images: :func:`fitting_batch`). ``workers``
    decode in worker processes (0: in this one), seeded from ``seed`` (their random crops
    and flips): reading data never draws from torch's global generator, so the training
    loop's own draws (sampled strengths, random starts) are the same on every path."""
    if rows is None:
        n, batch_size = len(data), fitting_batch(data, batch_size)
        rows = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    sampler = [r.tolist() for r in rows]
    loader = DataLoader(_Rows(data), batch_sampler=sampler, collate_fn=_as_batch,
                        num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=False,
                        generator=torch.Generator().manual_seed(seed))
    try:
        yield from loader
    except AdvguardError as exc:
        if workers == 0 or "Traceback" not in str(exc):
            raise
        raise type(exc)(_worker_message(str(exc))) from None


def _worker_message(text: str) -> str:
    """The one-line message of an advguard error raised in a DataLoader worker (which torch
    re-raises with the worker's whole traceback as its text)."""
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith("advguard.errors.") else last


def materialise(data: ImageDataset, limit: int | None = None, *,
                workers: int = 0, batch_size: int = 256) -> ImageSet:
    """The first ``limit`` items of ``data`` as an in-memory :class:`ImageSet` (for attacks
    and evaluations on a slice; the whole of a big dataset would not fit)."""
    data, _ = as_dataset(data)
    if isinstance(data, ImageSet):
        return data if limit is None else data.subset(slice(0, limit))
    info = info_of(data)
    if info is None:
        raise InputError("the dataset carries no info (shape, classes): wrap it with "
                         "advguard.data.with_info")
    n = len(data) if limit is None else min(limit, len(data))
    size = n * 4 * int(np.prod(info.shape))
    if size > MATERIALISE_BYTES:
        raise InputError(f"{n} images of {'x'.join(map(str, info.shape))} take "
                         f"{size / 2**30:.1f} GiB in memory: give a limit (--test-limit N)")
    rows = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    xs, ys = [], []
    for x, y, _ in batches(data, rows, workers=workers):
        xs.append(x)
        ys.append(y)
    return ImageSet(torch.cat(xs), torch.cat(ys), info)


class _WithInfo(Dataset):
    def __init__(self, dataset: ImageDataset, info: DatasetInfo) -> None:
        self.dataset, self.info = dataset, info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


def with_info(data: Any, num_classes: int | None = None, *, name: str = "custom",
              mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> ImageDataset:
    """A user's dataset with the facts advguard needs (:class:`DatasetInfo`): the image shape
    from its first item, the classes from ``num_classes`` or its ``classes`` attribute (as
    torchvision's datasets have), and the defaults of natural images for the rest. Datasets
    that carry ``info`` already are returned as they are."""
    from advguard.data.datasets import custom_info

    dataset, _ = as_dataset(data)
    if info_of(dataset) is not None:
        return dataset
    names = tuple(str(c) for c in getattr(dataset, "classes", ()) or ())
    classes = num_classes or len(names)
    if not classes:
        raise InputError("give num_classes: the dataset has no 'classes' attribute")
    image = as_image(dataset[0][0], "dataset item 0")
    c, h, w = image.shape
    return _WithInfo(dataset, custom_info(
        name, channels=c, size=(h, w), num_classes=classes,
        mean=tuple(mean) if mean is not None else (0.5,) * c,
        std=tuple(std) if std is not None else (0.25,) * c, classes=names))
