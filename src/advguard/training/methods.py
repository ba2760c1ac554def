"""The training methods every report names (SPEC A3), and the PGD-AT baseline."""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    ORIGINAL = "original"  # clean data only
    SINGLE = "single"  # clean ∪ f_ε(clean)
    MIXED = "mixed"  # mixed MAT: one model, clean + every strength
    PARALLEL = "parallel"  # parallel MAT: one member per strength + a voting unit
    PGD_AT = "pgd-at"  # Madry et al.'s PGD adversarial training (white-box baseline)


PAPER_METHODS = (Method.ORIGINAL, Method.SINGLE, Method.MIXED, Method.PARALLEL)
MULTI_STRENGTH = (Method.MIXED, Method.PARALLEL)  # the methods strength selection chooses for
