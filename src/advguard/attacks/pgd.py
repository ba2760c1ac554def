"""L∞ projected gradient descent (Madry et al. 2018) for white-box evaluation and training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from advguard.attacks.base import check_attack_inputs, check_strengths, eval_mode, input_gradient


@dataclass(frozen=True)
class PGD:
    """L∞ PGD with random start.

    steps: gradient steps per restart. step_size: per-step change in pixel units; ``None`` means
    ``2.5 · eps / steps`` (Madry et al.). restarts: independent random starts; an example counts as
    fooled if any restart fools the model. seed: seeds the random starts.
    """

    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    seed: int = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float) -> torch.Tensor:
        check_attack_inputs(x, y)
        (eps,) = check_strengths(eps)
        return self.run(model, x, y, eps)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """The attack without input checks (for loops that already checked their data)."""
        x = x.detach()
        if eps == 0.0:
            return x.clone()
        alpha = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        best = x.clone()
        still_correct = torch.ones(len(x), dtype=torch.bool, device=x.device)
        with eval_mode(model):
            for _ in range(self.restarts):
                if self.random_start:
                    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                    adv = (x + (2 * noise - 1) * eps).clamp_(0.0, 1.0)
                else:
                    adv = x.clone()
                for _ in range(self.steps):
                    step = alpha * input_gradient(model, adv, y).sign()
                    adv = torch.min(torch.max(adv + step, x - eps), x + eps).clamp_(0.0, 1.0)
                with torch.no_grad():
                    fooled = model(adv).argmax(1) != y
                # keep the newest attempt of every example no earlier restart has fooled
                best[still_correct] = adv[still_correct]
                still_correct &= ~fooled
                if not still_correct.any():
                    break
        return best


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float],
        **kwargs: object) -> torch.Tensor | list[torch.Tensor]:
    """Functional form of :class:`PGD`: one tensor for a float ``eps``, a list for a sequence."""
    attack = PGD(**kwargs)  # type: ignore[arg-type]
    if isinstance(eps, (int, float)):
        return attack(model, x, y, eps)
    return [attack(model, x, y, e) for e in check_strengths(eps)]
