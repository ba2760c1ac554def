"""Saving and loading models: safetensors weights + the :class:`ModelCard` that rebuilds the
module, so any advguard checkpoint loads from itself alone (no dataset or zoo lookup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from advguard.errors import CheckpointError, InputError
from advguard.io import load_tensors, save_tensors
from advguard.models.builders import ModelCard, build, card_for, runs_user_code


def save_model(path: str | Path, model: nn.Module, *, card: ModelCard | None = None,
               arch: str | None = None, dataset: str | None = None, **meta: Any) -> Path:
    """Write ``model``'s weights with the card that rebuilds it (``card``, or that of zoo
    architecture ``arch`` on dataset ``dataset``) and ``meta`` (e.g. the training config)."""
    if card is None:
        if arch is None or dataset is None:
            raise ValueError("save_model needs a ModelCard, or arch and dataset")
        card = card_for(arch, dataset)
    return save_tensors(path, model.state_dict(),
                        {"arch": card.builder if arch is None else arch,
                         "dataset": dataset or "custom", "model": card.to_json(), **meta})


def model_card(meta: dict[str, Any], where: str | Path = "checkpoint", *,
               trust_builder: bool = True) -> ModelCard:
    """The card in a checkpoint's metadata; checkpoints written before cards were saved name a
    zoo ``arch`` and a ``dataset``. A card whose builder runs a user's code
    (``package.module:factory``) is refused unless ``trust_builder``: a checkpoint file must
    not be able to run code by being opened."""
    if "model" in meta:
        card = ModelCard.from_json(meta["model"], str(where))
        if runs_user_code(card.builder) and not trust_builder:
            raise CheckpointError(
                f"{where} is built by {card.builder!r}: loading it imports and runs that "
                "package's code; give --trust-builder (trust_builder=True) if you trust the file")
        return card
    if not isinstance(meta.get("arch"), str) or not isinstance(meta.get("dataset"), str):
        raise CheckpointError(f"{where} is not an advguard model checkpoint (its metadata "
                              "needs a model description, or 'arch' and 'dataset' names)")
    if runs_user_code(meta["arch"]):
        raise CheckpointError(f"{where} names no zoo architecture: {meta['arch']!r}")
    return card_for(meta["arch"], meta["dataset"])


def load_model(path: str | Path, *, trust_builder: bool = False
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns ``(model in eval mode, metadata)``.
    ``trust_builder``: see :func:`model_card`."""
    tensors, meta = load_tensors(path)
    card = model_card(meta, path, trust_builder=trust_builder)
    try:
        model = build(card)
    except (InputError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its model {card.builder!r} cannot be built: "
                              f"{str(exc).splitlines()[0]}") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its model {card.builder!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), meta
