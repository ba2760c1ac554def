"""Attacks: ``attack(model, x, y, eps) -> x_adv`` with inputs and outputs in [0, 1].

Every attack derives from :class:`Attack`: it restores the model's train/eval mode, leaves its
weights and their gradients untouched, and returns images within ``eps`` of ``x`` in its norm
(:mod:`advguard.attacks.norms`: L∞ by default, L2 for :class:`FGM` and ``PGD(norm="l2")``).
"""

from advguard.attacks.base import (
    Attack,
    Loss,
    Strength,
    check_attack_inputs,
    cross_entropy,
    input_gradient,
    loss_gradient,
    project,
    random_targets,
    with_restarts,
)
from advguard.attacks.external import TorchattacksAPGD, TorchattacksPGD, Transferred
from advguard.attacks.fgsm import (
    FGM,
    FGSM,
    fgsm,
    fgsm_directions,
    fgsm_directions_file,
    gradient_sign,
    perturb,
)
from advguard.attacks.lbfgs import LBFGS, LBFGSReport
from advguard.attacks.norms import L2, LINF, NORMS, Norm, norm_named
from advguard.attacks.pgd import PGD, pgd
from advguard.attacks.random_start import NoiseFGSM, RandomStartFGSM
from advguard.attacks.registry import ATTACKS, attack_names, build_attack
from advguard.attacks.trades import TradesKL, trades_kl
from advguard.models.inference import eval_mode
from advguard.options import check_strengths

__all__ = ["ATTACKS", "FGM", "FGSM", "L2", "LBFGS", "LINF", "NORMS", "PGD", "Attack",
           "LBFGSReport", "Loss", "attack_names", "build_attack",
           "NoiseFGSM", "Norm", "RandomStartFGSM", "Strength", "TorchattacksAPGD",
           "TorchattacksPGD", "TradesKL", "Transferred", "check_attack_inputs",
           "check_strengths", "cross_entropy", "eval_mode", "fgsm", "fgsm_directions",
           "fgsm_directions_file", "gradient_sign", "input_gradient", "loss_gradient",
           "norm_named", "perturb", "pgd", "project", "random_targets", "trades_kl",
           "with_restarts"]
