"""Attacks: ``attack(model, x, y, eps) -> x_adv`` with inputs and outputs in [0, 1].

Every attack restores the model's train/eval mode, leaves its weights and their gradients
untouched, and returns images within ``eps`` of ``x`` in the L∞ norm.
"""

from advguard.attacks.base import check_strengths, eval_mode
from advguard.attacks.fgsm import fgsm, fgsm_directions, gradient_sign, perturb
from advguard.attacks.lbfgs import LBFGS, LBFGSReport
from advguard.attacks.pgd import PGD, pgd

__all__ = ["LBFGS", "LBFGSReport", "PGD", "check_strengths", "eval_mode", "fgsm",
           "fgsm_directions", "gradient_sign", "perturb", "pgd"]
