"""One training loop (SPEC A3) and what it mixes into each batch."""

from advguard.training.loop import SCHEDULES, TrainConfig, TrainResult, accuracy, train
from advguard.training.mixing import (
    DirectionSource,
    ExampleSource,
    PGDExamples,
    RandomStartFGSM,
    StrengthMix,
    TransferDirections,
    WhiteBoxDirections,
    random_start_fgsm,
)
from advguard.training.recipes import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "SCHEDULES", "DirectionSource", "ExampleSource", "PGDExamples",
           "RandomStartFGSM", "Recipe", "StrengthMix", "TrainConfig", "TrainResult",
           "TransferDirections", "WhiteBoxDirections", "accuracy", "get_recipe",
           "random_start_fgsm", "train"]
