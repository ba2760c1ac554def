"""Robustness curves (accuracy vs. strength) and their grid means (SPEC A6)."""

from advguard.evaluation.robustness import (
    ThreatSetting,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
    strength_grid,
)

__all__ = ["ThreatSetting", "curve_from_directions", "fgsm_curve", "grid_mean", "pgd_curve",
           "strength_grid"]
