"""Robustness curves (accuracy vs. strength) and their grid means (SPEC A6), detection metrics,
and the robustness audit (independent attacks, gradient-masking checks)."""

from advguard.evaluation.audit import AuditReport, audit, independent_attacks
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

__all__ = ["AuditReport", "OperatingPoint", "ThreatSetting", "audit", "auc",
           "curve_from_directions", "eer", "eer_accuracy", "fgsm_curve", "grid_mean",
           "independent_attacks", "keep_threshold", "operating_point", "pgd_curve", "roc",
           "strength_grid", "threshold_sweep"]
