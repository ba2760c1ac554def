"""One training loop (SPEC A3), what it mixes into each batch, and where the copies come from."""

from advguard.training.config import Optimizer, Precision, Schedule, TrainConfig
from advguard.training.job import Trained, TrainJob, train_job
from advguard.training.loop import TrainResult, train
from advguard.training.methods import MULTI_STRENGTH, PAPER_METHODS, Method
from advguard.training.mixing import StrengthMix
from advguard.training.recipes import RECIPES, Recipe, RecipeName, get_recipe
from advguard.training.sources import AdversarialSource, Transfer, WhiteBox

__all__ = ["MULTI_STRENGTH", "PAPER_METHODS", "RECIPES", "AdversarialSource", "Method",
           "Optimizer", "Precision", "Recipe", "RecipeName", "Schedule", "StrengthMix",
           "TrainConfig", "TrainJob", "TrainResult", "Trained",
           "Transfer", "WhiteBox", "get_recipe", "train", "train_job"]
