"""One training loop (SPEC A3) and what it mixes into each batch."""

from advguard.training.loop import TrainConfig, TrainResult, accuracy, train
from advguard.training.mixing import (
    DirectionSource,
    StrengthMix,
    TransferDirections,
    WhiteBoxDirections,
)

__all__ = ["DirectionSource", "StrengthMix", "TrainConfig", "TrainResult", "TransferDirections",
           "WhiteBoxDirections", "accuracy", "train"]
