"""Where the training loop's adversarial copies come from: one small protocol, two sources.

* :class:`WhiteBox` — any :class:`~advguard.attacks.Attack` on the model being trained, online,
  every batch (white-box setting, SPEC A2). With :class:`~advguard.attacks.FGSM` every strength
  of a batch shares one gradient (SPEC A1).
* :class:`Transfer` — a fixed dataset of FGSM directions crafted once on a separate crafting
  model (the paper's transfer setting; see :func:`advguard.attacks.fgsm_directions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from advguard.attacks import FGSM, Attack, perturb
from advguard.data import FlipCrop


class AdversarialSource(Protocol):
    """``copies(model, x, y, index, strengths, augment) -> one adversarial copy of the batch
    per strength``; each strength is a per-example tensor (B,), ``index`` holds the batch's
    dataset rows and ``augment`` the crop and flip ``x`` went through (or ``None``)."""

    def copies(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               strengths: Sequence[torch.Tensor],
               augment: FlipCrop | None = None) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class WhiteBox:
    """Copies crafted by ``attack`` on the model being trained."""

    attack: Attack = field(default_factory=FGSM)

    def copies(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               strengths: Sequence[torch.Tensor],
               augment: FlipCrop | None = None) -> list[torch.Tensor]:
        return self.attack.craft_many(model, x, y, strengths)  # on the augmented images


@dataclass(frozen=True)
class Transfer:
    """Fixed FGSM directions of the training set, int8 (N, C, H, W), row i belonging to
    training example i."""

    directions: torch.Tensor

    def copies(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               strengths: Sequence[torch.Tensor],
               augment: FlipCrop | None = None) -> list[torch.Tensor]:
        direction = self.directions[index].to(x.device)
        if augment is not None:  # the crop and flip its image went through
            direction = augment(direction)
        return [perturb(x, direction, e) for e in strengths]
