"""What the training loop mixes into each batch (SPEC A3).

A :class:`StrengthMix` says which FGSM strengths join the clean batch and how; a
:class:`DirectionSource` says where the FGSM directions come from:

* :class:`WhiteBoxDirections` — the model being trained, online, every batch (white-box setting);
* :class:`TransferDirections` — a fixed dataset of directions crafted once on a separate crafting
  model (the paper's transfer setting; see :func:`advguard.attacks.fgsm_directions`).

Either way the copies of a batch at every strength share one gradient (SPEC A1).

======================  ============================  =========================================
method                  mix                           batch of B clean examples becomes
======================  ============================  =========================================
original                ``StrengthMix(())``           the B clean examples
single-strength ε       ``StrengthMix((ε,))``         B clean + B at ε
mixed MAT, full size    ``StrengthMix(E)``            B clean + B at each ε of E: (S+1)·B
mixed MAT, reduced      ``StrengthMix(E, True)``      B examples, each fixed to one of clean/ε_s
parallel member k       ``StrengthMix((ε_k,))``       B clean + B at ε_k
======================  ============================  =========================================

The loss is the mean cross-entropy over the mixed batch, i.e. eq. (2)'s ``J_M`` divided by the
constant (S+1)·B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from advguard.attacks import check_strengths, gradient_sign, perturb


class DirectionSource(Protocol):
    """Gives ``sign(∇_x J)`` for a batch: ``(model, x, y, index) -> direction``."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor: ...


class WhiteBoxDirections:
    """FGSM directions from the model being trained (white-box setting, SPEC A2)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        return gradient_sign(model, x, y)


@dataclass
class TransferDirections:
    """Fixed FGSM directions of the training set, crafted on a separate model (transfer setting).

    ``directions`` is int8 (N, C, H, W), row i belonging to training example i.
    """

    directions: torch.Tensor

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        return self.directions[index].to(x.device)


@dataclass(frozen=True)
class StrengthMix:
    """Clean examples plus FGSM copies at ``strengths``; ``reduced`` keeps the total at N_C."""

    strengths: tuple[float, ...] = ()
    reduced: bool = False
    _levels: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strengths:
            check_strengths(self.strengths)
        object.__setattr__(self, "_levels", torch.tensor((0.0, *self.strengths)))

    def groups(self, n: int, seed: int) -> torch.Tensor | None:
        """Reduced size: each of ``n`` examples is fixed to one subset (0 = clean, s = ε_s),
        balanced and seeded; ``None`` for the other methods."""
        if not self.reduced or not self.strengths:
            return None
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        groups = torch.empty(n, dtype=torch.long)
        groups[order] = torch.arange(n) % (len(self.strengths) + 1)
        return groups

    def batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
              directions: DirectionSource,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch built from the clean batch ``(x, y)`` of dataset rows ``index``."""
        if not self.strengths:
            return x, y
        direction = directions(model, x, y, index)
        if self.reduced:
            if groups is None:
                raise ValueError("reduced-size mixing needs the groups from StrengthMix.groups")
            eps = self._levels.to(x.device)[groups[index].to(x.device)]
            return perturb(x, direction, eps), y
        copies = [x] + [perturb(x, direction, e) for e in self.strengths]
        return torch.cat(copies), y.repeat(len(copies))
