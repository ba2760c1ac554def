"""Datasets (in-memory tensors in [0, 1]), seeded splits and input validation."""

from advguard.data.checks import check_images, check_labels
from advguard.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageSet,
    Split,
    dataset_info,
    load_dataset,
    read_cifar_binary,
    read_idx,
    train_val_split,
)

__all__ = [
    "DATASETS", "DatasetInfo", "ImageSet", "Split", "check_images", "check_labels",
    "dataset_info", "load_dataset", "read_cifar_binary", "read_idx", "train_val_split",
]
