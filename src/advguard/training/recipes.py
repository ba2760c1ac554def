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
``trades``   10 signed steps on the KL to the clean output (Zhang    no (its      one-cycle to
             et al. 2019); loss CE(clean) + 6·KL, strengths           loss has    5e-3, 100
             sampled per example and ramped                         the clean)
``mart``     PGD-10 on the cross-entropy (Wang et al. 2020); loss   no (its      one-cycle to
             boosted CE(adversarial) + 6·KL·(1 − p_y(clean)),         loss has    5e-3, 100
             strengths sampled per example and ramped               the clean)
===========  =====================================================  ===========  ==============

The one-cycle schedule, peak and batch are Wong et al.'s MNIST settings; PGD-AT gets the same
ones so the two are compared side by side.

In the transfer setting the copies are the crafting model's FGSM directions whatever the recipe
says, so only ``fgsm`` applies there.

:meth:`Recipe.in_norm` gives a recipe's L2 version (strengths are then L2 radii): FGSM becomes
FGM (one gradient, normalised to unit L2 length, every strength from it), PGD steps along the
normalised gradient in the L2 ball; the recipes whose attack has no L2 form (``fgsm-rs``,
``n-fgsm``, ``trades``) are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from advguard.attacks import FGSM, PGD, Attack, NoiseFGSM, RandomStartFGSM, TradesKL
from advguard.attacks.registry import in_norm
from advguard.errors import InputError, parse_choice
from advguard.training.config import Schedule, TrainConfig
from advguard.training.mixing import StrengthMix


class RecipeName(str, Enum):
    FGSM = "fgsm"
    FGSM_RS = "fgsm-rs"
    N_FGSM = "n-fgsm"
    PGD_3 = "pgd-3"
    PGD_AT = "pgd-at"
    TRADES = "trades"
    MART = "mart"


@dataclass(frozen=True)
class Recipe:
    name: RecipeName
    summary: str
    attack: Attack  # crafts the copies in the white-box setting (transfer: the crafter's FGSM)
    clean: bool  # keep the clean copy in every batch
    sample: bool  # several strengths: one drawn per example (True) or one copy each (False)
    schedule: Schedule  # TrainConfig.schedule
    lr: float  # Adam learning rate (the peak of a one-cycle schedule)
    batch_size: int  # clean examples per step
    ramp: float = 0.0  # TrainConfig.ramp: strengths rise from 0 over this fraction of training
    average: float = 0.0  # TrainConfig.average: EMA decay of the weights (0: off)
    beta: float = 0.0  # TrainConfig.trades_beta: the TRADES loss's weight (0: cross-entropy)
    mart: float = 0.0  # TrainConfig.mart_beta: the MART loss's weight (0: off)

    def config(self, **overrides: Any) -> TrainConfig:
        """The training configuration of this recipe: batch size, lr, schedule, ε ramp and
        weight averaging are the recipe's unless given (``None`` counts as not given), every
        other field :class:`TrainConfig`'s default unless given."""
        own = {"batch_size": self.batch_size, "lr": self.lr, "schedule": self.schedule,
               "ramp": self.ramp, "average": self.average, "trades_beta": self.beta,
               "mart_beta": self.mart}
        given = {k: v for k, v in overrides.items() if v is not None}
        return TrainConfig(**{**own, **given})

    def passes(self, strengths: Sequence[float], epochs: int, *,
               reduced: bool = False, stability: bool = False) -> int:
        """Forward-backward passes per training example over ``epochs`` white-box epochs:
        crafting (the attack's passes per strength, or one shared gradient) plus one training
        pass per copy in the batch; with ``stability`` (``TrainConfig.stability`` > 0) the
        near-copy's pass too, and the clean image's where the batch does not already hold it
        (TRADES and MART, and batches that keep the clean copy, reuse its outputs)."""
        mix = self.mix(strengths, reduced=reduced)
        paired = bool(mix.strengths) and (self.beta > 0 or self.mart > 0)
        near = (1 if paired or mix.clean_first else 2) if stability else 0
        if not mix.strengths:
            return epochs * (1 + near)
        if mix.reduced:
            return epochs * (self.attack.passes + 1 + near)
        crafted = 1 if mix.sample else len(mix.strengths)
        craft = self.attack.passes * (1 if self.attack.shares_gradient
                                      else crafted)
        clean = mix.clean or paired  # TRADES' and MART's losses hold the clean image
        return epochs * (craft + crafted + int(clean) + near)

    def checks(self, strengths: Sequence[float], epochs: int, *,
               reduced: bool = False) -> int:
        """Forward passes without a gradient per training example over ``epochs`` white-box
        epochs: the attack's success checks and reference outputs, per crafted copy."""
        mix = self.mix(strengths, reduced=reduced)
        if not mix.strengths:
            return 0
        crafted = 1 if mix.reduced or mix.sample else len(mix.strengths)
        return epochs * self.attack.checks * (1 if self.attack.shares_gradient else crafted)

    @property
    def norm(self) -> str:
        """The threat model of its copies (``linf`` or ``l2``)."""
        return self.attack.threat.name

    def in_norm(self, norm: str) -> Recipe:
        """This recipe with its copies crafted in ``norm`` (its attack's registered form there:
        FGSM becomes FGM, PGD steps in the L2 ball)."""
        if norm == self.norm:
            return self
        attack = in_norm(self.attack, norm)
        if attack is None:
            able = [n.value for n, r in RECIPES.items() if in_norm(r.attack, norm) is not None]
            raise InputError(f"the {self.name.value} recipe crafts with "
                             f"{type(self.attack).__name__}, which has no {norm} form; "
                             f"recipes in {norm.upper()}: {', '.join(able)}")
        return dataclasses.replace(self, attack=attack)

    def mix(self, strengths: Sequence[float], *, reduced: bool = False) -> StrengthMix:
        """The batch mixing of a method trained at ``strengths`` (empty: clean training)."""
        strengths = tuple(float(e) for e in strengths)
        if not strengths:
            return StrengthMix(norm=self.norm)
        if reduced:  # the paper's reduced-size mixed MAT keeps its fixed groups
            return StrengthMix(strengths, reduced=True, norm=self.norm)
        return StrengthMix(strengths, sample=self.sample and len(strengths) > 1,
                           clean=self.clean, norm=self.norm)


RECIPES: dict[RecipeName, Recipe] = {
    RecipeName.FGSM: Recipe(
        RecipeName.FGSM, "clean + plain FGSM copies at every strength, constant learning rate "
        "(the MAT paper's)", FGSM(), clean=True, sample=False, schedule=Schedule.CONSTANT,
        lr=1e-3, batch_size=128),
    RecipeName.FGSM_RS: Recipe(
        RecipeName.FGSM_RS, "FGSM from a random start (step 1.25·ε) at strengths sampled per "
        "example, adversarial copies only, one-cycle learning rate", RandomStartFGSM(1.25),
        clean=False, sample=True, schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100),
    RecipeName.N_FGSM: Recipe(
        RecipeName.N_FGSM, "N-FGSM: FGSM from noise U(-2ε, 2ε), step ε, not projected back to "
        "the ε-ball (de Jorge et al. 2022), strengths sampled per example, adversarial copies "
        "only, one-cycle learning rate", NoiseFGSM(2.0, 1.0), clean=False, sample=True,
        schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100),
    RecipeName.PGD_3: Recipe(
        RecipeName.PGD_3, "PGD-3 from a random start (step 2.5·ε/3), strengths ramped up "
        "from 0 over the first 30% of the steps and sampled per example, adversarial copies "
        "only, one-cycle learning rate: a tenth of PGD-40's passes (the ramp, not PGD-AT's "
        "per-example early stop, is what lets it train)",
        PGD(steps=3, seed=None, keep_best=False),
        clean=False, sample=True, schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100,
        ramp=0.3),
    RecipeName.PGD_AT: Recipe(
        RecipeName.PGD_AT, "PGD-40 with random start (step 2.5·ε/40), adversarial copies only, "
        "early-stopped per example, one-cycle learning rate (Madry et al.'s PGD adversarial "
        "training as Wong et al. run it)",
        # noise from torch's global generator, which the training loop seeds and checkpoints;
        # without the early stop the small MNIST CNN stayed at chance (11%) for all 10 epochs
        PGD(steps=40, seed=None, early_stop=True, keep_best=False),
        clean=False, sample=True, schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100),
    RecipeName.TRADES: Recipe(
        RecipeName.TRADES, "TRADES (Zhang et al. 2019): cross-entropy on the clean image + "
        "β·KL(clean ‖ adversarial), β = 6, the adversarial image from 10 signed steps on the KL "
        "(step 2.5·ε/10), strengths sampled per example and ramped up over the first 30% of "
        "the steps, one-cycle learning rate", TradesKL(steps=10), clean=False, sample=True,
        schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100, ramp=0.3, beta=6.0),
    RecipeName.MART: Recipe(
        RecipeName.MART, "MART (Wang et al. 2020): boosted cross-entropy on the adversarial "
        "image + β·KL(clean ‖ adversarial)·(1 − p_y(clean)), β = 6, the adversarial image from "
        "PGD-10 on the cross-entropy (random start, step 2.5·ε/10), strengths sampled per "
        "example and ramped up over the first 30% of the steps, one-cycle learning rate",
        PGD(steps=10, seed=None, keep_best=False), clean=False, sample=True,
        schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=100, ramp=0.3, mart=6.0),
}


def get_recipe(name: str | RecipeName) -> Recipe:
    return RECIPES[parse_choice(RecipeName, name, "recipe")]
