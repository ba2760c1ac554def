"""Saving and loading models: safetensors weights + the metadata that rebuilds the module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from advguard.errors import CheckpointError
from advguard.io import load_tensors, save_tensors
from advguard.models.zoo import build_model


def save_model(path: str | Path, model: nn.Module, *, arch: str, dataset: str,
               **meta: Any) -> Path:
    """Write ``model``'s weights with ``arch``/``dataset`` so :func:`load_model` can rebuild it."""
    return save_tensors(path, model.state_dict(), {"arch": arch, "dataset": dataset, **meta})


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns ``(model in eval mode, metadata)``."""
    tensors, meta = load_tensors(path)
    if not isinstance(meta.get("arch"), str) or not isinstance(meta.get("dataset"), str):
        raise CheckpointError(f"{path} is not an advguard model checkpoint (its metadata "
                              "needs 'arch' and 'dataset' names)")
    model = build_model(meta["arch"], meta["dataset"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match architecture {meta['arch']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), meta
