"""The attack interface every attack shares (in the manner of foolbox 3).

An attack is a frozen dataclass of settings; the model and the data are call arguments::

    x_adv = attack(model, x, y, eps)          # eps a float -> one tensor
    x_advs = attack(model, x, y, [e1, e2])    # eps a list  -> one tensor per strength

:meth:`Attack.__call__` validates the images, labels and strengths, puts the model in eval mode
(restoring its mode afterwards), and :meth:`Attack.craft` clips every result to the L∞ ε-ball
around ``x`` and to [0, 1] itself instead of trusting the subclass. A subclass writes only its
step, :meth:`Attack.perturb`. Strengths reach ``perturb`` as a float, or as a per-example tensor
shaped ``(N, 1, 1, 1)`` when the training loop asks for one strength per example.

PGD's objective is an override point (:class:`Loss`): the adaptive attack on the kNN detector is
a loss, not a copy of PGD's loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.attacks.norms import LINF, Norm, norm_named
from advguard.batching import map_batches
from advguard.data.checks import check_images, check_labels
from advguard.errors import InputError
from advguard.models.inference import eval_mode
from advguard.options import is_number

Strength = float | torch.Tensor  # one strength, or one per example (N,)


def check_attack_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    check_images(x)
    check_labels(y, x.shape[0])


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``model`` scores (one forward pass of one image)."""
    try:
        with torch.no_grad(), eval_mode(model):
            return int(model(x[:1]).shape[1])
    except RuntimeError as exc:
        raise InputError(f"the model cannot take images of shape {tuple(x.shape[1:])}: "
                         f"{str(exc).splitlines()[0]}") from None


def as_strength(eps: Strength, x: torch.Tensor) -> Strength:
    """A float as is; a per-example tensor (N,) reshaped to broadcast against ``x``."""
    if isinstance(eps, torch.Tensor):
        return eps.to(x.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return float(eps)


def project(x: torch.Tensor, adv: torch.Tensor, eps: Strength) -> torch.Tensor:
    """``adv`` clipped to the L∞ ball of radius ``eps`` around ``x`` and to [0, 1]."""
    return LINF.project(x, adv, eps)


class Loss(Protocol):
    """An attack objective: ``(model, x, y) -> (loss summed over the batch, logits)``. PGD
    ascends it (descends it when targeted); the logits serve its early stop and success test."""

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def cross_entropy(model: nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default objective: summed cross-entropy of ``model`` at ``x``."""
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), logits


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  loss: Loss = cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∇_x loss, logits)`` at ``x``; the weights' gradients are left untouched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value, logits = loss(model, x, y)
        (grad,) = torch.autograd.grad(value, x)
    return grad, logits.detach()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_x of the summed cross-entropy of ``model`` at ``x``."""
    return loss_gradient(model, x, y)[0]


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A target class ≠ the true class for every label, uniform over the others (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return (y.cpu() + torch.randint(1, num_classes, (len(y),), generator=gen)) % num_classes


def with_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, restarts: int,
                  one_start: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  fooled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Run ``one_start(x_todo, y_todo, index_todo)`` up to ``restarts`` times; each restart
    attacks only the examples no earlier one fooled (``fooled(logits, y)``, default: the
    prediction is not ``y``). Returns the last attempt of every example."""
    is_fooled = fooled or (lambda logits, labels: logits.argmax(1) != labels)
    best = x.clone()
    todo = torch.arange(len(x), device=x.device)
    for _ in range(restarts):
        adv = one_start(x[todo], y[todo], todo)
        with torch.no_grad(), eval_mode(model):
            done = is_fooled(model(adv), y[todo])
        best[todo] = adv
        todo = todo[~done]
        if len(todo) == 0:
            break
    return best


class Attack(ABC):
    """Base of every attack: validation, eval mode, projection; subclasses write
    :meth:`perturb`. ``shares_gradient`` attacks (FGSM) craft all strengths from one gradient.

    ``reach`` is the L∞ radius of the result in units of ``eps`` (1: the ε-ball; a training
    perturbation such as N-FGSM's deliberately goes further). :attr:`passes` counts the
    forward-backward passes per example one strength costs, :attr:`checks` the forward passes
    without a gradient (training cost is counted in both).
    """

    reach: ClassVar[float] = 1.0
    shares_gradient: ClassVar[bool] = False

    @property
    def threat(self) -> Norm:
        """The norm of the ball this attack stays in (a ``norm`` field, else L∞)."""
        return norm_named(getattr(self, "norm", LINF))

    def strengths(self, eps: float | Sequence[float], x: torch.Tensor) -> list[float]:
        """``eps`` as a list of strengths of this attack's norm (one clear error if not)."""
        return self.threat.check_all(eps, tuple(x.shape[1:]))

    @property
    def passes(self) -> int:
        """Forward-backward passes per example and strength (one gradient by default)."""
        return 1

    @property
    def checks(self) -> int:
        """Forward passes without a gradient per example and strength (success checks, a clean
        reference output): none by default."""
        return 0

    @overload
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float) -> torch.Tensor: ...
    @overload
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: Sequence[float]) -> list[torch.Tensor]: ...

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float | Sequence[float]) -> torch.Tensor | list[torch.Tensor]:
        """Adversarial copies of ``x`` (N, C, H, W) in [0, 1] with labels ``y`` (N,): one tensor
        for a float ``eps``, a list (one per strength) for a sequence."""
        check_attack_inputs(x, y)
        strengths = self.strengths(eps, x)
        check_labels(y, len(x), num_classes(model, x))
        out = self.craft_many(model, x, y.long(), strengths)
        single = is_number(eps) or (isinstance(eps, (torch.Tensor, np.ndarray))
                                     and eps.ndim == 0)
        return out[0] if single else out

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              eps: Strength) -> torch.Tensor:
        """One strength (or one per example), without input checks: for loops over data that
        were checked already. Eval mode, projection and detaching are done here."""
        x = x.detach()
        e = as_strength(eps, x)
        with eval_mode(model):
            adv = self.perturb(model, x, y, e)
        return self.threat.project(x, adv.detach(), e * self.reach)

    def craft_many(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   strengths: Sequence[Strength]) -> list[torch.Tensor]:
        """One adversarial copy per strength (a separate run each, unless overridden)."""
        return [self.craft(model, x, y, e) for e in strengths]

    def craft_dataset(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                      batch_size: int = 500, device: str | torch.device = "cpu",
                      progress: bool = False, desc: str = "attack") -> torch.Tensor:
        """:meth:`craft` over a whole dataset in batches on ``device``; the result on the CPU.
        ``y`` are the labels (or, for a targeted attack, the target classes)."""
        check_attack_inputs(x, y)
        (strength,) = self.strengths(eps, x)
        model.to(device)
        check_labels(y, len(x), num_classes(model, x[:1].to(device)))
        return map_batches(lambda xb, yb: self.craft(model, xb, yb, strength), x, y,
                           batch_size=batch_size, device=device, progress=progress, desc=desc)

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        """The attack's own work: adversarial images near ``x`` (the model is in eval mode;
        ``eps`` is a float or broadcasts against ``x``)."""
