"""The papers' architectures (SPEC A2), model checkpoints, and running a model for predictions."""

from advguard.models.checkpoint import load_model, save_model
from advguard.models.inference import accuracy, correct, eval_mode, predict
from advguard.models.zoo import MODELS, InputNorm, build_model, model_for

__all__ = ["MODELS", "InputNorm", "accuracy", "build_model", "correct", "eval_mode",
           "load_model", "model_for", "predict", "save_model"]
