"""FGSM (Goodfellow et al. 2015), SPEC A1: ``clip(x + ε · sign(∇_x J(θ, x, y)), 0, 1)``.

The sign of the gradient does not depend on ε, so the copies of a batch at S strengths cost one
forward + backward pass: :class:`FGSM` crafts every strength of a call from one gradient, and
:func:`fgsm_directions` stores the signs of a whole dataset (int8) so that any strength can be
applied later with :func:`perturb`. This is the one FGSM used by training, dataset crafting and
evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, overload

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks.base import (
    Attack,
    Strength,
    as_strength,
    check_attack_inputs,
    input_gradient,
    project,
)
from advguard.batching import map_batches
from advguard.data import ImageDataset, batches
from advguard.errors import InputError
from advguard.io import load_array
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
class FGM(Attack):
    """The fast gradient method in its ``norm``: one step of length ε along the gradient's
    steepest-ascent direction — in L2 (the default here) the gradient normalised to unit
    length, ``clip(x + ε · ∇/‖∇‖₂, 0, 1)``. Every strength of a call shares the gradient: S
    strengths cost one forward + backward pass."""

    shares_gradient: ClassVar[bool] = True
    norm: str = "l2"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return self.craft_many(model, x, y, [eps])[0]

    def craft_many(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   strengths: Sequence[Strength]) -> list[torch.Tensor]:
        x = x.detach()
        direction = self.direction(model, x, y)
        return [self.step(x, direction, e) for e in strengths]

    def direction(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            return self.threat.direction(input_gradient(model, x, y))

    def step(self, x: torch.Tensor, direction: torch.Tensor, eps: Strength) -> torch.Tensor:
        """``clip(x + ε · direction, 0, 1)``: the direction has unit length in the norm, so the
        step lands on the ball's surface and clipping to [0, 1] only shortens it — no other
        projection is needed (it would cost a norm per image and strength)."""
        return (x + direction * as_strength(eps, x)).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class FGSM(FGM):
    """FGM in L∞ (SPEC A1): one signed-gradient step of size ε, every strength of a call from
    one gradient — the signs as :func:`fgsm_directions` stores them."""

    norm: str = "linf"

    def direction(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gradient_sign(model, x, y)

    def step(self, x: torch.Tensor, direction: torch.Tensor, eps: Strength) -> torch.Tensor:
        return project(x, perturb(x, direction, eps), as_strength(eps, x))


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


def fgsm_directions_file(model: nn.Module, data: ImageDataset, path: str | Path, *,
                         batch_size: int = 500, device: str | torch.device = "cpu",
                         workers: int = 0, progress: bool = False,
                         desc: str = "FGSM directions") -> torch.Tensor:
    """:func:`fgsm_directions` of any dataset (an image folder, streamed batch by batch)
    written to ``path`` as an int8 ``.npy`` file, and returned memory-mapped: a row is read
    from disk when it is indexed, so the directions of a dataset larger than RAM fit. The
    file is written under a temporary name and renamed when complete."""
    path = Path(path)
    model = model.to(device)
    out = None
    tmp = path.with_name(path.name + ".tmp")
    with tqdm(total=len(data), desc=desc, disable=not progress, leave=False) as bar:
        for x, y, rows in batches(data, batch_size=batch_size, workers=workers):
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8,
                                                shape=(len(data), *x.shape[1:]))
            sign = gradient_sign(model, x.to(device), y.to(device)).to(torch.int8).cpu()
            out[rows.numpy()] = sign.numpy()
            bar.update(len(rows))
    if out is None:
        raise InputError("no images to craft FGSM directions of")
    out.flush()
    del out
    os.replace(tmp, path)
    return load_array(path)
