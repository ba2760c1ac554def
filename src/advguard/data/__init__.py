"""Datasets (in-memory tensors in [0, 1]), their facts, seeded splits and input validation."""

from advguard.data.augment import FlipCrop
from advguard.data.checks import check_images, check_labels
from advguard.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageSet,
    dataset_info,
    load_dataset,
    strength_grid,
    train_val_split,
)
from advguard.data.readers import Split, read_cifar_binary, read_idx

__all__ = [
    "DATASETS", "DatasetInfo", "FlipCrop", "ImageSet", "Split", "check_images", "check_labels",
    "dataset_info", "load_dataset", "read_cifar_binary", "read_idx", "strength_grid",
    "train_val_split",
]
