"""Running a model for its predictions: eval mode restored afterwards, batched, on any device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from advguard.batching import map_batches


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000,
            device: str | torch.device = "cpu", progress: bool = False,
            desc: str = "predict") -> torch.Tensor:
    """Predicted classes (N,) of ``model`` in eval mode on images ``x``, on the CPU."""
    with eval_mode(model):
        return map_batches(lambda xb: model(xb).argmax(1), x, batch_size=batch_size,
                           device=device, progress=progress, desc=desc)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Bool (N,): where ``model`` classifies ``x`` as ``y``."""
    return predict(model, x, **kwargs) == y.cpu()  # type: ignore[arg-type]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: object) -> float:
    """Fraction of ``x`` that ``model`` (in eval mode) classifies as ``y``."""
    if len(x) == 0:
        return 0.0
    return float(correct(model, x, y, **kwargs).double().mean())
