"""FGSM (Goodfellow et al. 2015), SPEC A1: ``clip(x + ε · sign(∇_x J(θ, x, y)), 0, 1)``.

The sign of the gradient does not depend on ε, so the copies of a batch at S strengths cost one
forward + backward pass: :func:`fgsm` accepts a list of strengths, and :func:`fgsm_directions`
stores the signs of a whole dataset (int8) so that any strength can be applied later with
:func:`perturb`. This is the one FGSM used by training, dataset crafting and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks.base import check_attack_inputs, check_strengths, eval_mode, input_gradient


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


@overload
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor: ...
@overload
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         eps: Sequence[float]) -> list[torch.Tensor]: ...


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         eps: float | Sequence[float]) -> torch.Tensor | list[torch.Tensor]:
    """FGSM adversarial examples of ``x`` (N, C, H, W) in [0, 1] with labels ``y`` (N,).

    ``eps`` a float gives one tensor; a sequence gives a list, one tensor per strength, all from
    a single gradient. The model's train/eval mode is restored and its weights are untouched.
    """
    check_attack_inputs(x, y)
    strengths = check_strengths(eps)
    direction = gradient_sign(model, x, y)
    out = [perturb(x.detach(), direction, e) for e in strengths]
    return out[0] if isinstance(eps, (int, float)) else out


def fgsm_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500,
                    device: str | torch.device = "cpu", progress: bool = False,
                    desc: str = "FGSM directions") -> torch.Tensor:
    """``sign(∇_x J)`` of a whole dataset as int8 (N, C, H, W), on the CPU.

    This is a fixed FGSM dataset for every strength at once: ``perturb(x, d, eps)`` is
    ``f_eps(x)`` exactly (SPEC A1/A2, the transfer setting's crafted datasets).
    """
    check_attack_inputs(x, y)
    out = torch.empty(x.shape, dtype=torch.int8)
    model = model.to(device)
    for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress,
                      leave=False):
        sl = slice(start, start + batch_size)
        out[sl] = gradient_sign(model, x[sl].to(device), y[sl].to(device)).to(torch.int8).cpu()
    return out
