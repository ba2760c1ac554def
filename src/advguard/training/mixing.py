"""What the training loop mixes into each batch (SPEC A3).

A :class:`StrengthMix` says which strengths join the clean batch and how; an
:class:`~advguard.training.sources.AdversarialSource` says where the adversarial copies come
from (any attack on the model being trained, or the transfer setting's fixed directions).

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

import torch
from torch import nn

from advguard.attacks import norm_named
from advguard.data import FlipCrop
from advguard.training.sources import AdversarialSource


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
    norm: str = "linf"  # the strengths' norm: L∞ strengths in [0, 1], L2 radii ≥ 0
    _levels: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strengths:
            norm_named(self.norm).check_all(self.strengths)
        if self.reduced and self.sample:
            raise ValueError("a StrengthMix is reduced or sampled, not both")
        if not self.clean and (self.reduced or not self.strengths):
            raise ValueError("clean=False needs strengths and full or sampled mixing")
        object.__setattr__(self, "_levels", torch.tensor((0.0, *self.strengths)))

    @property
    def clean_first(self) -> bool:
        """Whether :meth:`batch` begins with the clean batch itself (clean training, or full
        or sampled mixing that keeps the clean copy)."""
        return not self.strengths or (self.clean and not self.reduced)

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
              source: AdversarialSource, groups: torch.Tensor | None = None, *,
              scale: float = 1.0, augment: FlipCrop | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch built from the clean batch ``(x, y)`` of dataset rows ``index``;
        every strength multiplied by ``scale`` (a strength curriculum). ``augment``: the crop
        and flip ``x`` has been through, for sources that hold per-row data."""
        if not self.strengths:
            return x, y
        levels = self._levels.to(x.device) * scale
        if self.reduced:
            if groups is None:
                raise ValueError("reduced-size mixing needs the groups from StrengthMix.groups")
            eps = levels[groups[index].to(x.device)]
            (copy,) = source.copies(model, x, y, index, [eps], augment)
            return _keep_clean_at_zero(copy, x, eps), y
        if self.sample:
            pick = torch.randint(len(self.strengths), (len(x),)).to(x.device)
            adv = source.copies(model, x, y, index, [levels[1:][pick]], augment)
        else:  # one copy per strength (FGSM: all from one gradient, SPEC A1)
            adv = source.copies(model, x, y, index,
                                [levels[s].expand(len(x)) for s in range(1, len(levels))],
                                augment)
        copies = [x, *adv] if self.clean else adv
        return torch.cat(copies), y.repeat(len(copies))


def _keep_clean_at_zero(adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Examples whose strength is 0 stay exactly clean, whatever the attack does at ε = 0."""
    return torch.where(eps.reshape(-1, *[1] * (x.dim() - 1)) > 0, adv, x)
