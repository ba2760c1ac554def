"""The papers' architectures (SPEC A2) and model checkpoints."""

from advguard.models.checkpoint import load_model, save_model
from advguard.models.zoo import MODELS, ROLES, InputNorm, build_model, model_for

__all__ = ["MODELS", "ROLES", "InputNorm", "build_model", "load_model", "model_for", "save_model"]
