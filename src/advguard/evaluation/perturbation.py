"""Perturbation size at matched success rates: how much larger FGSM's perturbations are than
L-BFGS's when both fool the same share of images (detection paper, §4)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advguard.attacks import FGSM
from advguard.models import correct


def lbfgs_vs_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lbfgs_l2: np.ndarray,
                  lbfgs_success: np.ndarray, rates: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
                  ) -> list[dict[str, float]]:
    """For each rate r, on the correctly classified ``x``: the mean L2 of the r share of images
    L-BFGS fools most cheaply, and the mean L2 of FGSM at the smallest ε (bisection) that fools
    a share r."""
    keep = correct(model, x, y).numpy()
    x, y = x[keep], y[keep]
    l2 = np.sort(lbfgs_l2[keep][lbfgs_success[keep]])
    fgsm = FGSM()
    rows = []
    for rate in rates:
        need = int(np.ceil(rate * len(x)))
        if need == 0 or need > len(l2):
            continue
        lo, hi = 0.0, 1.0
        for _ in range(16):
            mid = (lo + hi) / 2
            fooled = ~correct(model, fgsm(model, x, y, mid), y)
            lo, hi = (lo, mid) if fooled.float().mean() >= rate else (mid, hi)
        adv = fgsm(model, x, y, hi)
        fooled = ~correct(model, adv, y)
        if fooled.float().mean() < rate:
            continue  # FGSM cannot reach this rate even at eps = 1
        rows.append({"success_rate": rate, "lbfgs_mean_l2": float(l2[:need].mean()),
                     "fgsm_eps": hi,
                     "fgsm_mean_l2": float((adv - x).flatten(1).norm(dim=1)[fooled].mean())})
    return rows
