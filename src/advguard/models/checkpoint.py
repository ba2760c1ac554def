"""Saving and loading models: safetensors weights + the :class:`ModelCard` that rebuilds the
module, so any advguard checkpoint loads from itself alone (no dataset or zoo lookup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from advguard.errors import CheckpointError
from advguard.io import load_tensors, save_tensors
from advguard.models.builders import ModelCard, build, card_for


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


def model_card(meta: dict[str, Any], where: str | Path = "checkpoint") -> ModelCard:
    """The card in a checkpoint's metadata; checkpoints written before cards were saved name a
    zoo ``arch`` and a ``dataset``."""
    if "model" in meta:
        return ModelCard.from_json(meta["model"], str(where))
    if not isinstance(meta.get("arch"), str) or not isinstance(meta.get("dataset"), str):
        raise CheckpointError(f"{where} is not an advguard model checkpoint (its metadata "
                              "needs a model description, or 'arch' and 'dataset' names)")
    return card_for(meta["arch"], meta["dataset"])


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns ``(model in eval mode, metadata)``."""
    tensors, meta = load_tensors(path)
    card = model_card(meta, path)
    model = build(card)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its model {card.builder!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), meta
