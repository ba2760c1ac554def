"""What every attack shares: input checks, strength checks and mode restoration."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from advguard.data.checks import check_images, check_labels
from advguard.errors import InputError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_strengths(eps: float | Sequence[float]) -> list[float]:
    """Validate an L∞ strength or a list of them (pixel units, each in [0, 1])."""
    values = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not values:
        raise InputError("no strength given: eps must be a float or a non-empty list")
    for e in values:
        if not isinstance(e, (int, float)) or not 0.0 <= float(e) <= 1.0:
            raise InputError(f"strength eps={e!r} must be a number in [0, 1] (pixel units; "
                             "0-255 strengths are eps/255)")
    return [float(e) for e in values]


def check_attack_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    check_images(x)
    check_labels(y, x.shape[0])


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_x of the summed cross-entropy of ``model`` at ``x`` (model weights' grads untouched)."""
    return gradient_and_logits(model, x, y)[0]


def gradient_and_logits(model: nn.Module, x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`input_gradient` and the logits of the same forward pass (detached)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()
