"""The options of ``advguard evaluate`` and ``advguard audit``, each default declared once (here):
the commands take them from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from advguard import options as opts
from advguard.attacks import PGD
from advguard.attacks.registry import EVALUATION, attack_names
from advguard.evaluation.audit import AUDIT_PGD
from advguard.evaluation.autoattack import IMPLEMENTATIONS, AutoAttack
from advguard.evaluation.robustness import Threat
from advguard.options import option

TEST_START_HELP = ("skip the split's first N images: --test-start 2000 --test-limit 1000 "
                   "attacks images 2,000–2,999 (a long evaluation run as slices)")


@dataclass(frozen=True)
class EvaluateOptions:
    attack: Threat = option(Threat("fgsm"), "white-box-NAME (crafted on the model) or "
                            "transfer-NAME (on --crafter) for a registered attack: "
                            + ", ".join(attack_names(EVALUATION)) + " (the paper's: "
                            "white-box-fgsm, white-box-pgd, transfer-fgsm)", parse=Threat.parse)
    grid: tuple[float, ...] = option((), "strengths, e.g. 0,0.1,0.3 or 0,8/255 (default: the "
                                         "dataset's L∞ grid; give one for L2)",
                                     parse=opts.radii)
    norm: str = option("linf", "threat model: linf (FGSM, PGD) or l2 (FGM, PGD-L2)")
    pgd_steps: int = option(PGD.steps, "PGD steps (white-box-pgd; step 2.5·ε/steps)")
    pgd_restarts: int = option(PGD.restarts, "PGD random starts (white-box-pgd)")
    test_limit: int | None = option(None, "first N images of the split (default: all)")
    test_start: int = option(0, TEST_START_HELP)
    seed: int = option(0, "seed of PGD's random starts")
    device: str = option("cpu", "torch device")

    def pgd(self) -> PGD:
        return PGD(steps=self.pgd_steps, restarts=self.pgd_restarts, seed=self.seed,
                   norm=self.norm)


@dataclass(frozen=True)
class AuditOptions:
    eps: float = option(0.3, "strength to audit at (pixel units), e.g. 0.3 or 8/255 (L∞), "
                             "or 0.5 (L2)", parse=opts.radius)
    norm: str = option("linf", "threat model: linf or l2 (every attack in that ball; "
                               "AutoAttack's standard L2 version)")
    pgd_steps: int = option(AUDIT_PGD.steps, "advguard PGD's steps")
    pgd_step_size: float | None = option(AUDIT_PGD.step_size, "PGD step in pixel units; none: "
                                                              "2.5·ε/steps")
    pgd_restarts: int = option(AUDIT_PGD.restarts, "advguard PGD's random starts")
    test_limit: int | None = option(None, "attack N images of the split (default: all of them; "
                                          "the run streams, resumes and shows its ETA)",
                                    parse=opts.limit)
    test_start: int = option(0, TEST_START_HELP)
    shard_size: int = option(500, "images attacked together and saved as one piece (the "
                                  "seeds are per piece: the same size gives the same outcome)")
    square_alone: bool = option(True, "also run Square on the images the gradient attacks "
                                      "broke (the masking check; costs Square's queries on them)")
    only_autoattack: bool = option(False, "AutoAttack and the cheap checks only (no PGD, sweep "
                                          "or transfer)")
    autoattack: str = option(AutoAttack.implementation, "AutoAttack's implementation: "
                             + " or ".join(IMPLEMENTATIONS) + " (the authors' code, pip install "
                             "'advguard[reference]')")
    seed: int = option(0, "seed of every random start")
    device: str = option("cpu", "torch device")

    def pgd(self) -> PGD:
        return PGD(steps=self.pgd_steps, step_size=self.pgd_step_size,
                   restarts=self.pgd_restarts, seed=self.seed)

    def reference(self) -> AutoAttack:
        return AutoAttack(seed=self.seed, implementation=self.autoattack,
                          square_alone=self.square_alone, norm=self.norm)
