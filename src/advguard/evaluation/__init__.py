"""Robustness curves (accuracy vs. strength) and their grid means (SPEC A6)."""

from advguard.evaluation.detection import (
    OperatingPoint,
    auc,
    eer,
    eer_accuracy,
    keep_threshold,
    operating_point,
    roc,
    threshold_sweep,
)
from advguard.evaluation.robustness import (
    ThreatSetting,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
    strength_grid,
)

__all__ = ["OperatingPoint", "ThreatSetting", "auc", "curve_from_directions", "eer",
           "eer_accuracy", "fgsm_curve", "grid_mean", "keep_threshold", "operating_point",
           "pgd_curve", "roc", "strength_grid", "threshold_sweep"]
