"""Models from anywhere: the papers' architectures (SPEC A2), torchvision, timm, Hugging Face
or a user's factory (:class:`ModelCard`; sources register themselves,
:func:`register_source`), a user's own module (:func:`wrap`), checkpoints that rebuild
themselves, and running a model for its predictions."""

from advguard.models import (  # noqa: F401  (each registers its source)
    huggingface,
    timm_models,
    torchvision_models,
)
from advguard.models.builders import (
    ModelCard,
    ModelOptions,
    Source,
    build,
    build_model,
    card_for,
    load_weights,
    register_source,
)
from advguard.models.checkpoint import load_model, model_card, save_model
from advguard.models.inference import accuracy, correct, eval_mode, predict
from advguard.models.wrap import Wrapped, pick_logits, wrap
from advguard.models.zoo import MODELS, InputNorm, model_for

__all__ = ["MODELS", "InputNorm", "ModelCard", "ModelOptions", "Source", "Wrapped", "accuracy",
           "build", "build_model", "card_for", "correct", "eval_mode", "load_model",
           "load_weights", "model_card", "model_for", "pick_logits", "predict",
           "register_source", "save_model", "wrap"]
