"""Choosing training strengths: the MSSIM bound (SPEC A4) and random-walk selection (A5)."""

from advguard.strengths.mssim import mssim, mssim_table, ssim_per_image, strength_bound
from advguard.strengths.results import (
    HAND_PICKED,
    RANDOM_WALK,
    Choice,
    MethodSelection,
    MssimBound,
    StrengthSelection,
)
from advguard.strengths.selection import (
    Selection,
    SelectOptions,
    Walk,
    agreement_rate,
    estimate_H,
    exhaustive_select,
    random_walk_select,
    transition_matrix,
)

__all__ = ["HAND_PICKED", "RANDOM_WALK", "Choice", "MethodSelection", "MssimBound",
           "SelectOptions", "Selection", "StrengthSelection", "Walk", "agreement_rate",
           "estimate_H", "exhaustive_select", "mssim", "mssim_table", "random_walk_select",
           "ssim_per_image", "strength_bound", "transition_matrix"]
