"""``hf:PATH`` — a Hugging Face ``transformers`` image classifier (ViT, ConvNeXt, Swin, ResNet,
…) from a local folder as ``save_pretrained`` writes it (``config.json``, and
``model.safetensors`` for trained weights). Nothing is downloaded.

* The folder's config is copied into the model card (a checkpoint rebuilds the architecture
  without the folder); the number of classes, channels and the image size follow the data.
* The image processor's normalisation (``preprocessor_config.json``: ``image_mean``,
  ``image_std``) goes inside the model, as every advguard model takes images in [0, 1].
* The logits are picked from the model's output (``.logits``).
* Weights in the folder are loaded (a classifier head of another size starts untrained, and
  says so); a checkpoint advguard saved loads its own weights over them.

``pip install 'advguard[hf]'`` installs ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from advguard.errors import InputError
from advguard.models.builders import ModelCard, Source, register_source

log = logging.getLogger(__name__)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("hf:… models need transformers: pip install 'advguard[hf]'") from None
    return transformers


def _read(path: Path, name: str) -> dict[str, Any] | None:
    file = path / name
    if not file.is_file():
        return None
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"hf:{path}: {name} is not readable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"hf:{path}: {name} holds no JSON object")
    return obj


def prepare(name: str, card: ModelCard) -> ModelCard:
    """The card with the folder's config and its processor's normalisation."""
    if "config" in card.kwargs:
        return card
    path = Path(name)
    config = _read(path, "config.json")
    if config is None:
        raise InputError(f"hf:{name}: no config.json there (a folder save_pretrained wrote)")
    processor = _read(path, "preprocessor_config.json") or {}
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == card.channels:
        card = dataclasses.replace(card, mean=tuple(map(float, mean)),
                                   std=tuple(map(float, std)))
    return dataclasses.replace(card, kwargs={**card.kwargs, "config": config})


def build(name: str, card: ModelCard) -> nn.Module:
    """The classifier of the card's config for the card's classes, channels and size, with the
    folder's weights where the folder (still) has them."""
    tf = _transformers()
    given = dict(card.kwargs.get("config") or prepare(name, card).kwargs["config"])
    model_type = given.pop("model_type", None)
    if model_type is None:
        raise InputError(f"hf:{name}: the config names no model_type")
    try:
        config = tf.AutoConfig.for_model(model_type, **given)
    except (ValueError, KeyError) as exc:
        raise InputError(f"hf:{name}: {exc}") from None
    config.num_labels = card.num_classes
    config.id2label = {i: c for i, c in enumerate(card.classes)} or {
        i: str(i) for i in range(card.num_classes)}
    config.label2id = {c: i for i, c in config.id2label.items()}
    for key, value in (("num_channels", card.channels), ("image_size", card.size[0])):
        if hasattr(config, key):
            setattr(config, key, value)
    auto = tf.AutoModelForImageClassification
    path = Path(name)
    try:
        if any((path / w).is_file() for w in WEIGHTS):
            model, info = auto.from_pretrained(
                str(path), config=config, local_files_only=True, ignore_mismatched_sizes=True,
                output_loading_info=True)
            if info.get("mismatched_keys") or info.get("missing_keys"):
                log.warning("hf:%s: %d weights start untrained (a head of %d classes?)", name,
                            len(info.get("mismatched_keys") or info.get("missing_keys")),
                            card.num_classes)
            return model
        return auto.from_config(config)
    except (ValueError, OSError, RuntimeError) as exc:
        raise InputError(f"hf:{name}: {str(exc).splitlines()[0]}") from None


register_source("hf", Source(build, prepare=prepare))
