"""Options every experiment offers for training its models (declared once, used by the MAT and
the detection configs): the learning-rate schedule and the recipe of a victim at the papers'
clean accuracy (flip/crop augmentation, label smoothing, channels-last)."""

from __future__ import annotations

from typing import Any

from advguard import options as opts
from advguard.options import option


def schedule_option(default: str) -> Any:
    return option(None, f"learning rate over training: constant or one-cycle (default: "
                        f"{default})")


def augment_option() -> Any:
    return option(False, "random crop, and flip where the dataset allows, of every training "
                         "batch")


def label_smoothing_option() -> Any:
    return option(0.0, "label smoothing of the training loss")


def channels_last_option() -> Any:
    return option(False, "NHWC memory layout while training (faster convolutions on CPUs)")


def check(label_smoothing: float) -> None:
    opts.check_below_one("label smoothing", label_smoothing)
