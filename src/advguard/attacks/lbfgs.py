"""Box-constrained L-BFGS attack (Szegedy et al. 2014), SPEC B5.

For each image x with a target class t ≠ y (drawn at random, seeded), minimise
``‖x' − x‖₂ + C · CE(model(x'), t)`` over ``x' ∈ [0, 1]`` with scipy's L-BFGS-B. C is searched per
image: a coarse ascending grid until the attack succeeds (model(x') = t), then a binary search
between the last failing and the first succeeding C; the smallest successful perturbation is kept.
Images for which no C succeeds are failures and are returned unchanged.

L-BFGS minimises the perturbation instead of taking a budget: called through the attack
interface, ``attack(model, x, y, eps)`` returns its result clipped to the L∞ ball of ``eps``
(``eps = 1`` leaves it unbounded); :meth:`LBFGS.run` gives the unclipped result with the success
of every image, its target and its L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from advguard.attacks.base import Attack, Strength, check_attack_inputs, random_targets
from advguard.models.inference import eval_mode


@dataclass
class LBFGSReport:
    x_adv: torch.Tensor  # adversarial images (the input where the attack failed)
    success: torch.Tensor  # bool (N,): the model predicts the target on x_adv
    target: torch.Tensor  # target classes (N,)
    l2: torch.Tensor  # ‖x_adv − x‖₂ per image (0 where it failed)


@dataclass(frozen=True)
class LBFGS(Attack):
    """c_grid: the coarse grid of C, ascending. binary_steps: refinements of C after the first
    success. max_iter: L-BFGS-B iterations per solve. seed: draws the target classes."""

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    binary_steps: int = 4
    max_iter: int = 50
    num_classes: int | None = None
    seed: int = 0

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return self.run(model, x, y).x_adv

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            target: torch.Tensor | None = None) -> LBFGSReport:
        check_attack_inputs(x, y)
        x = x.detach()
        with eval_mode(model), torch.no_grad():
            classes = self.num_classes or int(model(x[:1]).shape[1])
        if target is None:
            target = random_targets(y, classes, self.seed)
        target = target.to(x.device)
        n = len(x)
        best = x.clone()
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        lo = torch.zeros(n, dtype=torch.float64)
        hi = torch.full((n,), float("nan"), dtype=torch.float64)
        with eval_mode(model):
            for c in self.c_grid:  # coarse grid: raise C until each image succeeds
                todo = torch.nonzero(hi.isnan()).flatten()
                if len(todo) == 0:
                    break
                ok = self._solve(model, x, target, todo, torch.full((len(todo),), c,
                                 dtype=torch.float64), best, best_l2)
                hi[todo[ok]] = c
                lo[todo[~ok]] = c
            for _ in range(self.binary_steps):  # refine C between lo and hi
                todo = torch.nonzero(~hi.isnan()).flatten()
                if len(todo) == 0:
                    break
                mid = torch.where(lo[todo] > 0, (lo[todo] * hi[todo]).sqrt(), hi[todo] / 10)
                ok = self._solve(model, x, target, todo, mid, best, best_l2)
                hi[todo[ok]] = mid[ok]
                lo[todo[~ok]] = mid[~ok]
        success = torch.isfinite(best_l2)
        return LBFGSReport(best, success.cpu(), target.cpu(),
                           torch.where(success, best_l2, torch.zeros_like(best_l2)).cpu())

    def _solve(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               todo: torch.Tensor, c: torch.Tensor, best: torch.Tensor,
               best_l2: torch.Tensor) -> torch.Tensor:
        """One L-BFGS-B solve for images ``todo`` at constants ``c``; updates ``best`` where the
        attack succeeds with a smaller perturbation. Returns the success mask over ``todo``."""
        x0 = x[todo]
        t = target[todo]
        c_t = c.to(x.device, x.dtype)
        shape = x0.shape

        def fun(z_flat: np.ndarray) -> tuple[float, np.ndarray]:
            z = torch.from_numpy(z_flat).to(x.device, x.dtype).view(shape).requires_grad_(True)
            with torch.enable_grad():
                dist = ((z - x0).flatten(1).pow(2).sum(1) + 1e-12).sqrt()
                ce = F.cross_entropy(model(z), t, reduction="none")
                loss = (dist + c_t * ce).sum()
                (grad,) = torch.autograd.grad(loss, z)
            return float(loss.detach()), grad.flatten().double().cpu().numpy()

        z0 = x0.flatten().double().cpu().numpy()
        res = minimize(fun, z0, jac=True, method="L-BFGS-B",
                       bounds=np.stack([np.zeros_like(z0), np.ones_like(z0)], axis=1),
                       options={"maxiter": self.max_iter})
        z = torch.from_numpy(res.x).to(x.device, x.dtype).view(shape).clamp(0, 1)
        with torch.no_grad():
            ok = model(z).argmax(1) == t
        l2 = (z - x0).flatten(1).norm(dim=1)
        better = ok & (l2 < best_l2[todo])
        idx = todo[better]
        best[idx] = z[better]
        best_l2[idx] = l2[better]
        return ok.cpu()
