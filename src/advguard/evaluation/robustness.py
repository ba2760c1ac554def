"""Robustness curves: accuracy under an attack at every strength of a grid (SPEC A6).

The paper's three threat settings, named as reports name them:

* ``transfer-fgsm`` — FGSM directions crafted on a separate crafting model (the paper's setting);
* ``white-box-fgsm`` — FGSM on the evaluated model itself (for an ensemble: the whole ensemble);
* ``white-box-pgd`` — L∞ PGD with random start on the evaluated model itself.

Beyond them, any registered evaluation attack, white-box or transferred (:class:`Threat`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks import (
    LINF,
    PGD,
    Attack,
    check_strengths,
    fgsm_directions,
    norm_named,
    perturb,
)
from advguard.attacks.registry import EVALUATION, attack_names, build_attack
from advguard.batching import batch_slices
from advguard.errors import InputError
from advguard.models import eval_mode


class ThreatSetting(str, Enum):
    """The MAT paper's three settings (its curves' names in every result file)."""

    TRANSFER_FGSM = "transfer-fgsm"
    WHITE_BOX_FGSM = "white-box-fgsm"
    WHITE_BOX_PGD = "white-box-pgd"


WHITE_BOX, TRANSFER = "white-box-", "transfer-"


@dataclass(frozen=True)
class Threat:
    """A registered evaluation attack (:mod:`advguard.attacks.registry`), white-box (crafted on
    the model evaluated) or transferred (crafted on another model): ``white-box-pgd``,
    ``transfer-fgsm``, ``white-box-apgd-ce``, … — the paper's settings among them."""

    attack: str
    transfer: bool = False

    @property
    def value(self) -> str:
        return (TRANSFER if self.transfer else WHITE_BOX) + self.attack

    @classmethod
    def parse(cls, text: str | ThreatSetting | Threat) -> Threat:
        if isinstance(text, Threat):
            return text
        text = text.value if isinstance(text, ThreatSetting) else str(text)
        for prefix, transfer in ((WHITE_BOX, False), (TRANSFER, True)):
            if text.startswith(prefix) and text[len(prefix):] in attack_names(EVALUATION):
                return cls(text[len(prefix):], transfer)
        raise InputError(f"unknown attack {text!r}; choose one of: {', '.join(threat_names())}")

    def build(self, norm: str, pgd: PGD) -> Attack:
        """The attack in ``norm``; a PGD takes ``pgd``'s settings."""
        return build_attack(self.attack, norm, **{f.name: getattr(pgd, f.name)
                                                   for f in dataclasses.fields(pgd)
                                                   if f.name != "norm"})


def threat_names() -> list[str]:
    """Every evaluation attack, white-box and transferred (derived from the registry)."""
    names = attack_names(EVALUATION)
    return [WHITE_BOX + n for n in names] + [TRANSFER + n for n in names]


def grid_mean(curve: Sequence[float]) -> float:
    """The mean accuracy over the grid (the paper's Table 1 number)."""
    return float(sum(curve) / len(curve))


@torch.no_grad()
def curve_from_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          directions: torch.Tensor, grid: Sequence[float], *,
                          batch_size: int = 1000, device: str | torch.device = "cpu",
                          progress: bool = False, desc: str = "curve") -> list[float]:
    """Accuracy of ``model`` on ``perturb(x, directions, eps)`` for every ``eps`` of ``grid``."""
    grid = check_strengths(grid)
    correct = torch.zeros(len(grid), dtype=torch.float64)
    with eval_mode(model):
        for sl in batch_slices(len(x), batch_size, progress=progress, desc=desc):
            xb, yb, db = x[sl].to(device), y[sl].to(device), directions[sl].to(device)
            for j, eps in enumerate(grid):
                correct[j] += (model(perturb(xb, db, eps)).argmax(1) == yb).sum().cpu()
    return (correct / len(x)).tolist()


def fgsm_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grid: Sequence[float], *,
               crafter: nn.Module | None = None, batch_size: int = 1000,
               device: str | torch.device = "cpu", progress: bool = False) -> list[float]:
    """FGSM curve: white-box (directions from ``model``) or transfer (from ``crafter``)."""
    source = model if crafter is None else crafter
    d = fgsm_directions(source, x, y, batch_size=batch_size, device=device, progress=progress)
    return curve_from_directions(model, x, y, d, grid, batch_size=batch_size, device=device,
                                 progress=progress)


def attack_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grid: Sequence[float],
                 attack: Attack, *, batch_size: int = 1000, device: str | torch.device = "cpu",
                 progress: bool = False, desc: str = "attack") -> list[float]:
    """Accuracy under white-box ``attack`` (one run per strength) for every ``eps``."""
    grid = check_strengths(grid)
    correct = torch.zeros(len(grid), dtype=torch.float64)
    model.to(device)
    steps = [(j, sl) for j in range(len(grid)) for sl in batch_slices(len(x), batch_size)]
    for j, sl in tqdm(steps, desc=desc, disable=not progress, leave=False):
        xb, yb = x[sl].to(device), y[sl].to(device)
        adv = attack.craft(model, xb, yb, grid[j])
        with torch.no_grad(), eval_mode(model):
            correct[j] += (model(adv).argmax(1) == yb).sum().cpu()
    return (correct / len(x)).tolist()


def pgd_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grid: Sequence[float],
              attack: PGD = PGD(), *, batch_size: int = 1000,
              device: str | torch.device = "cpu", progress: bool = False,
              desc: str = "PGD") -> list[float]:
    """:func:`attack_curve` under white-box PGD."""
    return attack_curve(model, x, y, grid, attack, batch_size=batch_size, device=device,
                        progress=progress, desc=desc)


def curve_batch(model: nn.Module, grid: Sequence[float], threat: Threat | ThreatSetting | str,
                *, pgd: PGD = PGD(), crafter: nn.Module | None = None,
                device: str | torch.device = "cpu", norm: str = "linf"
                ) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """``fn(x, y)``: per image of one batch, whether ``model`` is still right at each strength
    of ``grid`` under ``threat`` (one column per strength, named :func:`strength_column`) —
    the curve of a dataset of any size, streamed (:mod:`advguard.evaluation.outcomes`). The
    attack is the registered one in ``norm`` (``fgsm``: FGSM in L∞, FGM in L2, every strength
    from one gradient; ``pgd``: ``pgd``'s settings in that ball), crafted on ``crafter`` in a
    transfer setting."""
    threat = Threat.parse(threat)
    ball = norm_named(norm)
    grid = check_strengths(grid) if ball is LINF else [ball.check(e) for e in grid]
    attack = threat.build(ball.name, pgd)
    source = crafter if threat.transfer else model
    if source is None:
        raise InputError(f"{threat.value} needs a crafting model")

    def fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = x.to(device), y.long().to(device)
        assert source is not None
        with eval_mode(model):
            advs = attack.craft_many(source, x, y, grid)
            with torch.no_grad():
                return {strength_column(eps): (model(adv).argmax(1) == y).cpu()
                        for eps, adv in zip(grid, advs, strict=True)}

    return fn


def strength_column(eps: float) -> str:
    return f"ε={eps!r}"
