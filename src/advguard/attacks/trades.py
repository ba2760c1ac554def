"""TRADES' inner maximisation (Zhang et al. 2019, "Theoretically principled trade-off between
robustness and accuracy"): PGD on the KL divergence between the model's output at the
adversarial point and at the clean image, from ``x + 0.001·N(0, 1)``, signed steps, projected
to the L∞ ball. The training loss that uses it lives in the training loop
(``TrainConfig.trades_beta``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advguard.attacks.base import Attack, Strength, project
from advguard.options import check_int


def trades_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """``Σ KL(softmax(clean) ‖ softmax(adv))`` over the batch, as TRADES writes it
    (``KLDivLoss(log_softmax(adv), softmax(clean))``, summed)."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1),
                    reduction="sum")


@dataclass(frozen=True)
class TradesKL(Attack):
    """``steps`` signed steps of ``step_scale · ε / steps`` ascending :func:`trades_kl`.

    TRADES' MNIST setting is 40 steps of 0.01 at ε = 0.3 (step_scale 1.33); the default here
    is 10 steps of 2.5·ε/10 (Madry et al.'s step rule), a quarter of the passes."""

    steps: int = 10
    step_scale: float = 2.5
    start: float = 0.001  # σ of the Gaussian start

    def __post_init__(self) -> None:
        check_int("TRADES steps", self.steps)

    @property
    def passes(self) -> int:
        """One gradient per step."""
        return self.steps

    @property
    def checks(self) -> int:
        """The clean output, the KL's reference: one forward pass without a gradient."""
        return 1

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        with torch.no_grad():
            clean = model(x)
        adv = project(x, x + self.start * torch.randn_like(x), eps)
        alpha = self.step_scale * eps / self.steps
        for _ in range(self.steps):
            adv = adv.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(trades_kl(model(adv), clean), adv)
            adv = project(x, adv.detach() + alpha * grad.sign(), eps)
        return adv
