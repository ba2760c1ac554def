"""Attacks advguard did not write, behind advguard's :class:`Attack` interface: torchattacks'
PGD with restarts and APGD (Croce & Hein 2020) with the cross-entropy or DLR loss, in the L∞ or
the L2 ball — the independent attacks of the audit — and any attack transferred from another
model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advguard.attacks.base import Attack, Strength, with_restarts
from advguard.errors import AdvguardError


def torchattacks_module() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AdvguardError("this attack needs torchattacks: pip install torchattacks") from exc
    return torchattacks


@dataclass(frozen=True)
class TorchattacksPGD(Attack):
    """torchattacks' PGD with ``restarts`` random starts (later ones only where earlier ones
    failed), seeded once per call through torch's global generator as torchattacks expects."""

    steps: int = 40
    step_size: float = 0.01
    restarts: int = 5
    seed: int = 0
    norm: str = "linf"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        ta = torchattacks_module()
        torch.manual_seed(self.seed)
        kind = ta.PGDL2 if self.threat.name == "l2" else ta.PGD

        def one_start(xs: torch.Tensor, ys: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return kind(model, eps=float(eps), alpha=self.step_size, steps=self.steps,
                        random_start=True)(xs, ys)

        return with_restarts(model, x, y, self.restarts, one_start)


@dataclass(frozen=True)
class TorchattacksAPGD(Attack):
    """torchattacks' APGD (Croce & Hein 2020) with the ``ce`` or ``dlr`` loss."""

    loss: str = "ce"
    steps: int = 100
    seed: int = 0
    norm: str = "linf"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return torchattacks_module().APGD(
            model, norm=self.threat.torchattacks(), eps=float(eps), steps=self.steps,
            n_restarts=1, seed=self.seed, loss=self.loss)(x, y)


@dataclass(frozen=True)
class Transferred(Attack):
    """``attack`` crafted on ``source`` whatever model it is asked to attack (black-box)."""

    source: nn.Module
    attack: Attack

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return self.attack.craft(self.source, x, y, eps)
