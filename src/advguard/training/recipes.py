"""Named training recipes: where adversarial copies come from, how strengths mix, which schedule.

A recipe turns a method's strengths into the :class:`StrengthMix`, the adversarial source and
the learning-rate schedule the one training loop runs with:

===========  =====================================================  ===========  ==============
recipe       adversarial copies                                     clean copy   lr, batch
===========  =====================================================  ===========  ==============
``fgsm``     plain FGSM, one copy per strength (the MAT paper's)    yes          1e-3 constant,
                                                                                 128
``fgsm-rs``  FGSM from a random start, step 1.25·ε (Wong et al.     no           one-cycle to
             2020); several strengths are *sampled* per example                  5e-3, 100
``pgd-at``   PGD-40 with random start, step 2.5·ε/40 (Madry et      no           one-cycle to
             al. 2018), early-stopped per example as in Wong et                  5e-3, 100
             al.'s baseline — the expensive baseline
===========  =====================================================  ===========  ==============

The one-cycle schedule, peak and batch are Wong et al.'s MNIST settings; PGD-AT gets the same
ones so the two are compared side by side.

In the transfer setting the copies are the crafting model's FGSM directions whatever the recipe
says, so only ``fgsm`` applies there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from advguard.errors import AdvguardError
from advguard.training.mixing import (
    ExampleSource,
    PGDExamples,
    StrengthMix,
    random_start_fgsm,
)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: ExampleSource | None  # None: plain FGSM directions (white-box or transfer)
    clean: bool  # keep the clean copy in every batch
    sample: bool  # several strengths: one drawn per example (True) or one copy each (False)
    schedule: str  # TrainConfig.schedule
    lr: float  # Adam learning rate (the peak of a one-cycle schedule)
    batch_size: int  # clean examples per step

    def mix(self, strengths: Sequence[float], *, reduced: bool = False) -> StrengthMix:
        """The batch mixing of a method trained at ``strengths`` (empty: clean training)."""
        strengths = tuple(float(e) for e in strengths)
        if not strengths:
            return StrengthMix()
        if reduced:  # the paper's reduced-size mixed MAT keeps its fixed groups
            return StrengthMix(strengths, reduced=True)
        return StrengthMix(strengths, sample=self.sample and len(strengths) > 1,
                           clean=self.clean)


RECIPES: dict[str, Recipe] = {
    "fgsm": Recipe("fgsm", "clean + plain FGSM copies at every strength, constant learning "
                   "rate (the MAT paper's)", None, clean=True, sample=False,
                   schedule="constant", lr=1e-3, batch_size=128),
    "fgsm-rs": Recipe("fgsm-rs", "FGSM from a random start (step 1.25·ε) at strengths sampled "
                      "per example, adversarial copies only, one-cycle learning rate",
                      random_start_fgsm(1.25), clean=False, sample=True, schedule="one-cycle",
                      lr=5e-3, batch_size=100),
    "pgd-at": Recipe("pgd-at", "PGD-40 with random start (step 2.5·ε/40), adversarial copies "
                     "only, early-stopped per example, one-cycle learning rate (Madry et al.'s PGD "
                     "adversarial training as Wong et al. run it)",
                     PGDExamples(steps=40), clean=False, sample=True, schedule="one-cycle",
                     lr=5e-3, batch_size=100),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise AdvguardError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]
