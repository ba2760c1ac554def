"""L∞ projected gradient descent (Madry et al. 2018) for white-box evaluation and training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from advguard.attacks.base import (
    check_attack_inputs,
    check_strengths,
    eval_mode,
    gradient_and_logits,
)


@dataclass(frozen=True)
class PGD:
    """L∞ PGD with random start.

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
    """

    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    seed: int | None = 0
    step_scale: float = 2.5
    early_stop: bool = False

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float) -> torch.Tensor:
        check_attack_inputs(x, y)
        (eps,) = check_strengths(eps)
        return self.run(model, x, y, eps)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            eps: float | torch.Tensor) -> torch.Tensor:
        """The attack without input checks (for loops that already checked their data).

        ``eps`` is one strength or one per example, shaped to broadcast against ``x``."""
        x = x.detach()
        if isinstance(eps, (int, float)) and eps == 0.0:
            return x.clone()
        gen = (None if self.seed is None
               else torch.Generator(device=x.device).manual_seed(self.seed))
        best = x.clone()
        todo = torch.arange(len(x), device=x.device)  # examples no restart has fooled yet
        with eval_mode(model):
            for _ in range(self.restarts):
                xs, ys = x[todo], y[todo]
                e = eps[todo] if isinstance(eps, torch.Tensor) and eps.dim() > 0 else eps
                adv = self._one_start(model, xs, ys, e, gen)
                with torch.no_grad():
                    fooled = model(adv).argmax(1) != ys
                best[todo] = adv
                todo = todo[~fooled]
                if len(todo) == 0:
                    break
        return best

    def _one_start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   eps: float | torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        alpha = self.step_size if self.step_size is not None else self.step_scale * eps / self.steps
        if self.random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            adv = (x + (2 * noise - 1) * eps).clamp_(0.0, 1.0)
        else:
            adv = x.clone()
        for _ in range(self.steps):
            grad, logits = gradient_and_logits(model, adv, y)
            moved = torch.min(torch.max(adv + alpha * grad.sign(), x - eps),
                              x + eps).clamp_(0.0, 1.0)
            if self.early_stop:
                still = (logits.argmax(1) == y).view(-1, *([1] * (x.dim() - 1)))
                moved = torch.where(still, moved, adv)
            adv = moved
        return adv


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float],
        **kwargs: object) -> torch.Tensor | list[torch.Tensor]:
    """Functional form of :class:`PGD`: one tensor for a float ``eps``, a list for a sequence."""
    attack = PGD(**kwargs)  # type: ignore[arg-type]
    if isinstance(eps, (int, float)):
        return attack(model, x, y, eps)
    return [attack(model, x, y, e) for e in check_strengths(eps)]
