"""Projected gradient descent (Madry et al. 2018) for white-box evaluation and training, in
the L∞ ball (the default) or the L2 ball (:mod:`advguard.attacks.norms`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from advguard.attacks.base import (
    Attack,
    Loss,
    Strength,
    cross_entropy,
    loss_gradient,
    with_restarts,
)
from advguard.attacks.norms import norm_named
from advguard.errors import InputError
from advguard.options import check_int


@dataclass(frozen=True)
class PGD(Attack):
    """PGD with random start, in the ``norm`` ball (``linf``: signed steps; ``l2``: steps along
    the normalised gradient, Madry et al.'s L2 PGD).

    steps: gradient steps per restart. step_size: per-step change in pixel units; ``None`` means
    ``step_scale · eps / steps`` (2.5, Madry et al.'s rule). restarts: independent random
    starts; an example counts as fooled if any restart fools the model, and later restarts
    attack only the examples no earlier one fooled. seed: seeds the random starts (``None``:
    torch's global generator, for training). early_stop: a step moves only the examples the
    model still classifies correctly (Wong et al. 2020's PGD-training baseline); the gradient is
    still computed for the whole batch, so the cost is PGD's. It lets PGD adversarial training
    start: while the model is at chance most examples stay at their random start, and training
    on fully attacked examples from the first step can leave a small MNIST CNN at chance for
    every epoch. Off for evaluation, where it would only weaken the attack.
    loss: the objective ascended (:func:`~advguard.attacks.base.cross_entropy` by default);
    targeted: ``y`` holds target classes and the loss is descended instead.
    keep_best: return, per example, the last iterate that succeeded (fooled the model, or reached
    the target) rather than the last iterate: an image fooled at step 7 and not at step 20
    counts as fooled, as in APGD's bookkeeping. It costs one forward pass per example after the
    last step. Training recipes turn it off (they train on the final iterate, as Madry et al.).
    """

    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    seed: int | None = 0
    step_scale: float = 2.5
    early_stop: bool = False
    loss: Loss = cross_entropy
    targeted: bool = False
    keep_best: bool = True
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_int("PGD steps", self.steps)
        check_int("PGD restarts", self.restarts)
        norm_named(self.norm)
        if self.step_size is not None and not 0.0 < float(self.step_size) <= 1.0:
            raise InputError(f"PGD step size must be in (0, 1] (pixel units), got "
                             f"{self.step_size!r}")
        if not 0.0 < float(self.step_scale) <= 10.0:
            raise InputError(f"PGD step scale must be in (0, 10], got {self.step_scale!r}")

    @property
    def passes(self) -> int:
        """Every step of every restart takes one gradient of the whole batch (an upper bound
        with restarts, which attack only what earlier ones did not fool)."""
        return self.steps * self.restarts

    @property
    def checks(self) -> int:
        """After every restart, one forward pass that finds what it fooled; with ``keep_best``
        one more, the final iterate's (an upper bound with restarts, as :attr:`passes`)."""
        return self.restarts * (1 + int(self.keep_best))

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            eps: Strength) -> torch.Tensor:
        """:meth:`craft` (no input checks), the name PGD's callers used before."""
        return self.craft(model, x, y, eps)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        if isinstance(eps, float) and eps == 0.0:
            return x.clone()
        gen = (None if self.seed is None
               else torch.Generator(device=x.device).manual_seed(self.seed))

        def one_start(xs: torch.Tensor, ys: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
            e = eps[todo] if isinstance(eps, torch.Tensor) and eps.dim() > 0 else eps
            return self._one_start(model, xs, ys, e, gen)

        return with_restarts(model, x, y, self.restarts, one_start, self._success)

    def _success(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == y if self.targeted else pred != y

    def _one_start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   eps: Strength, gen: torch.Generator | None) -> torch.Tensor:
        alpha = self.step_size if self.step_size is not None else self.step_scale * eps / self.steps
        ball = self.threat
        adv = ball.random_start(x, eps, gen) if self.random_start else x.clone()
        best, found = adv.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            grad, logits = loss_gradient(model, adv, y, self.loss)
            if self.keep_best:  # the logits are those of the current iterate
                hit = self._success(logits, y)
                best[hit], found = adv[hit], found | hit
            direction = ball.direction(grad)
            step = adv - alpha * direction if self.targeted else adv + alpha * direction
            moved = ball.project(x, step, eps)
            if self.early_stop:
                still = (~self._success(logits, y)).view(-1, *([1] * (x.dim() - 1)))
                moved = torch.where(still, moved, adv)
            adv = moved
        if not self.keep_best:
            return adv
        with torch.no_grad():
            final = self._success(model(adv), y)
        return torch.where((final | ~found).view(-1, *([1] * (x.dim() - 1))), adv, best)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float],
        **kwargs: object) -> torch.Tensor | list[torch.Tensor]:
    """Functional form of :class:`PGD`: one tensor for a float ``eps``, a list for a sequence."""
    return PGD(**kwargs)(model, x, y, eps)  # type: ignore[arg-type]
