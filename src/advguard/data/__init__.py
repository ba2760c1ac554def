"""Datasets (named ones in memory, image folders streamed, any torch Dataset), their facts,
seeded splits, batched reading and input validation."""

from advguard.data.augment import FlipCrop, near_copy
from advguard.data.checks import check_images, check_labels
from advguard.data.datasets import (
    DATASETS,
    VAL_SIZE,
    DatasetInfo,
    ImageSet,
    custom_info,
    dataset_info,
    load_dataset,
    strength_grid,
    train_val_split,
)
from advguard.data.folder import FolderImages, load_folder
from advguard.data.loading import (
    ImageDataset,
    as_dataset,
    batches,
    fitting_batch,
    info_of,
    materialise,
    subset,
    with_info,
)
from advguard.data.readers import Split, read_cifar_binary, read_idx
from advguard.data.sources import DataOptions, data_info, load_data

__all__ = [
    "DATASETS", "VAL_SIZE", "DataOptions", "DatasetInfo", "FlipCrop", "FolderImages",
    "ImageDataset", "ImageSet", "Split", "as_dataset", "batches", "check_images",
    "check_labels", "custom_info", "data_info", "dataset_info", "fitting_batch", "info_of",
    "load_data", "load_dataset", "load_folder", "materialise", "near_copy", "read_cifar_binary",
    "read_idx", "strength_grid", "subset", "train_val_split", "with_info",
]
