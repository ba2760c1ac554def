"""What the training loop mixes into each batch (SPEC A3).

A :class:`StrengthMix` says which FGSM strengths join the clean batch and how; a
:class:`DirectionSource` says where the FGSM directions come from:

* :class:`WhiteBoxDirections` — the model being trained, online, every batch (white-box setting);
* :class:`TransferDirections` — a fixed dataset of directions crafted once on a separate crafting
  model (the paper's transfer setting; see :func:`advguard.attacks.fgsm_directions`).

Either way the copies of a batch at every strength share one gradient (SPEC A1).

Beyond the paper, an :class:`ExampleSource` crafts the adversarial copies itself, one gradient
(or PGD run) per strength, for the white-box recipes of :mod:`advguard.training.recipes`:

* :class:`RandomStartFGSM` — FGSM from a uniform random start in the ε-ball with step
  ``ratio·ε``, projected back (Wong et al. 2020, "Fast is better than free");
* :class:`PGDExamples` — L∞ PGD (Madry et al. 2018), the expensive baseline.

======================  ============================  =========================================
method                  mix                           batch of B clean examples becomes
======================  ============================  =========================================
original                ``StrengthMix(())``           the B clean examples
single-strength ε       ``StrengthMix((ε,))``         B clean + B at ε
mixed MAT, full size    ``StrengthMix(E)``            B clean + B at each ε of E: (S+1)·B
mixed MAT, reduced      ``StrengthMix(E, True)``      B examples, each fixed to one of clean/ε_s
parallel member k       ``StrengthMix((ε_k,))``       B clean + B at ε_k
sampled strengths       ``StrengthMix(E, sample=True)``  B clean + B, each at an ε drawn from E
                                                      afresh every step (one gradient)
without the clean copy  ``StrengthMix(E, clean=False)``  the adversarial part only
======================  ============================  =========================================

The loss is the mean cross-entropy over the mixed batch, i.e. eq. (2)'s ``J_M`` divided by the
constant (S+1)·B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from advguard.attacks import PGD, check_strengths, eval_mode, gradient_sign, perturb
from advguard.attacks.base import input_gradient


class DirectionSource(Protocol):
    """Gives ``sign(∇_x J)`` for a batch: ``(model, x, y, index) -> direction``."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor: ...


class WhiteBoxDirections:
    """FGSM directions from the model being trained (white-box setting, SPEC A2)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        return gradient_sign(model, x, y)


@dataclass
class TransferDirections:
    """Fixed FGSM directions of the training set, crafted on a separate model (transfer setting).

    ``directions`` is int8 (N, C, H, W), row i belonging to training example i.
    """

    directions: torch.Tensor

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        return self.directions[index].to(x.device)


@runtime_checkable
class ExampleSource(Protocol):
    """Crafts adversarial copies of a batch: ``examples(model, x, y, eps) -> x_adv`` with ``eps``
    one strength per example, shape (B,)."""

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PGDExamples:
    """Adversarial copies by L∞ PGD with a random start (:class:`advguard.attacks.PGD`, noise
    from torch's global generator, which the training loop seeds and checkpoints).

    ``steps`` gradient steps of ``step_scale·ε/steps``: 40 steps of 2.5·ε/40 is Madry et al.'s
    PGD adversarial training. ``early_stop`` (on by default) stops moving an example once the
    model misclassifies it, as Wong et al.'s PGD baseline does; without it the small MNIST CNN
    stayed at chance (11%) for all 10 epochs of a 60k-image run.
    """

    steps: int = 40
    step_scale: float = 2.5
    early_stop: bool = True

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
        attack = PGD(steps=self.steps, step_scale=self.step_scale, seed=None,
                     early_stop=self.early_stop)
        return attack.run(model, x, y, _broadcast(eps.to(x.device, x.dtype), x))


@dataclass(frozen=True)
class RandomStartFGSM:
    """FGSM from a random start (Wong et al. 2020, "Fast is better than free"): δ₀ ~ U(−ε, ε),
    the loss gradient taken at ``x + δ₀`` *as is* (not clipped to the image range), one step
    δ = clip(δ₀ + ratio·ε·sign(∇), −ε, ε), then ``x + δ`` clipped to [0, 1].

    Taking the gradient at the unclipped start is their procedure and it matters on MNIST,
    where most pixels sit at 0: clipping the start first puts half of those pixels back on 0,
    takes most of the randomness out of the step, and a single-strength ε = 0.3 small CNN
    fell to 83% (and, with another data split, 20%) under PGD-40 at ε = 0.3 instead of 90%.
    Noise comes from torch's global generator, which the training loop seeds and checkpoints.
    """

    ratio: float = 1.25

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
        e = _broadcast(eps.to(x.device, x.dtype), x)
        start = (2 * torch.rand_like(x) - 1) * e
        with eval_mode(model):
            grad = input_gradient(model, x + start, y)
        delta = torch.max(torch.min(start + self.ratio * e * grad.sign(), e), -e)
        return (x + delta).clamp(0.0, 1.0).detach()


def random_start_fgsm(ratio: float = 1.25) -> RandomStartFGSM:
    """FGSM from a random start with step ``ratio·ε`` (see :class:`RandomStartFGSM`); their
    ``ratio`` 1.25 avoids catastrophic overfitting at their settings."""
    return RandomStartFGSM(ratio)


@dataclass(frozen=True)
class StrengthMix:
    """Clean examples plus adversarial copies at ``strengths``.

    ``reduced`` keeps the total at N_C (each example fixed to one of clean/ε_s); ``sample``
    gives each example of every batch one strength drawn afresh from ``strengths`` (one
    gradient per batch whatever S is); ``clean=False`` trains on the adversarial part only.
    """

    strengths: tuple[float, ...] = ()
    reduced: bool = False
    sample: bool = False
    clean: bool = True
    _levels: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strengths:
            check_strengths(self.strengths)
        if self.reduced and self.sample:
            raise ValueError("a StrengthMix is reduced or sampled, not both")
        if not self.clean and (self.reduced or not self.strengths):
            raise ValueError("clean=False needs strengths and full or sampled mixing")
        object.__setattr__(self, "_levels", torch.tensor((0.0, *self.strengths)))

    def groups(self, n: int, seed: int) -> torch.Tensor | None:
        """Reduced size: each of ``n`` examples is fixed to one subset (0 = clean, s = ε_s),
        balanced and seeded; ``None`` for the other methods."""
        if not self.reduced or not self.strengths:
            return None
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        groups = torch.empty(n, dtype=torch.long)
        groups[order] = torch.arange(n) % (len(self.strengths) + 1)
        return groups

    def batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
              source: DirectionSource | ExampleSource,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch built from the clean batch ``(x, y)`` of dataset rows ``index``."""
        if not self.strengths:
            return x, y
        levels = self._levels.to(x.device)
        if self.reduced:
            if groups is None:
                raise ValueError("reduced-size mixing needs the groups from StrengthMix.groups")
            return _adversarial(source, model, x, y, index, levels[groups[index].to(x.device)]), y
        if self.sample:
            pick = torch.randint(len(self.strengths), (len(x),)).to(x.device)
            adv = [_adversarial(source, model, x, y, index, levels[1:][pick])]
        elif isinstance(source, ExampleSource):
            adv = [source.examples(model, x, y, levels[s].expand(len(x)))
                   for s in range(1, len(levels))]
        else:  # one direction serves every strength (SPEC A1)
            direction = source(model, x, y, index)
            adv = [perturb(x, direction, e) for e in self.strengths]
        copies = [x, *adv] if self.clean else adv
        return torch.cat(copies), y.repeat(len(copies))


def _adversarial(source: DirectionSource | ExampleSource, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x`` attacked at per-example strengths ``eps`` (0 keeps an example clean)."""
    if isinstance(source, ExampleSource):
        adv = source.examples(model, x, y, eps)
        return torch.where(_broadcast(eps, x) > 0, adv, x)
    return perturb(x, source(model, x, y, index), eps)


def _broadcast(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return eps.reshape(-1, *[1] * (x.dim() - 1))
