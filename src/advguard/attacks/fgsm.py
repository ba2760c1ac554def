"""FGSM (Goodfellow et al. 2015), SPEC A1: ``clip(x + ε · sign(∇_x J(θ, x, y)), 0, 1)``.

The sign of the gradient does not depend on ε, so the copies of a batch at S strengths cost one
forward + backward pass: :class:`FGSM` crafts every strength of a call from one gradient, and
:func:`fgsm_directions` stores the signs of a whole dataset (int8) so that any strength can be
applied later with :func:`perturb`. This is the one FGSM used by training, dataset crafting and
evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, overload

import torch
from torch import nn

from advguard.attacks.base import (
    Attack,
    Strength,
    as_strength,
    check_attack_inputs,
    input_gradient,
    project,
)
from advguard.batching import map_batches
from advguard.models.inference import eval_mode


def gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sign(∇_x J)`` of ``model`` (evaluated in eval mode) as a tensor shaped like ``x``."""
    with eval_mode(model):
        return input_gradient(model, x, y).sign()


def perturb(x: torch.Tensor, direction: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``clip(x + eps · direction, 0, 1)``; ``eps`` may be a per-example tensor of shape (N,)."""
    direction = direction.to(x.dtype)
    if isinstance(eps, torch.Tensor):
        return torch.addcmul(x, eps.to(x.dtype).view(-1, *([1] * (x.ndim - 1))),
                             direction).clamp_(0.0, 1.0)
    return torch.add(x, direction, alpha=float(eps)).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class FGSM(Attack):
    """One signed-gradient step of size ε; every strength of a call shares the gradient."""

    shares_gradient: ClassVar[bool] = True

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return self.craft_many(model, x, y, [eps])[0]

    def craft_many(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   strengths: Sequence[Strength]) -> list[torch.Tensor]:
        x = x.detach()
        direction = gradient_sign(model, x, y)
        return [project(x, perturb(x, direction, e), as_strength(e, x)) for e in strengths]


@overload
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor: ...
@overload
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         eps: Sequence[float]) -> list[torch.Tensor]: ...


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         eps: float | Sequence[float]) -> torch.Tensor | list[torch.Tensor]:
    """``FGSM()(model, x, y, eps)``: one tensor for a float ``eps``, a list for a sequence."""
    return FGSM()(model, x, y, eps)


def fgsm_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500,
                    device: str | torch.device = "cpu", progress: bool = False,
                    desc: str = "FGSM directions") -> torch.Tensor:
    """``sign(∇_x J)`` of a whole dataset as int8 (N, C, H, W), on the CPU.

    This is a fixed FGSM dataset for every strength at once: ``perturb(x, d, eps)`` is
    ``f_eps(x)`` exactly (SPEC A1/A2, the transfer setting's crafted datasets).
    """
    check_attack_inputs(x, y)
    model = model.to(device)
    return map_batches(lambda xb, yb: gradient_sign(model, xb, yb).to(torch.int8), x, y,
                       batch_size=batch_size, device=device, progress=progress, desc=desc)
