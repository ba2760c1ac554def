"""Robustness curves (accuracy vs. strength) and their grid means (SPEC A6), detection metrics,
and the robustness audit (AutoAttack, independent attacks, gradient-masking checks)."""

from advguard.evaluation.audit import (
    AUDIT_PGD,
    AuditReport,
    TorchattacksAPGD,
    TorchattacksPGD,
    Transferred,
    audit,
    independent_attacks,
)
from advguard.evaluation.autoattack import AutoAttack, AutoAttackResult, merge_results
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
from advguard.evaluation.perturbation import lbfgs_vs_fgsm
from advguard.evaluation.robustness import (
    ThreatSetting,
    attack_curve,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
)

__all__ = ["AUDIT_PGD", "AuditReport", "AutoAttack", "AutoAttackResult", "OperatingPoint",
           "ThreatSetting", "TorchattacksAPGD",
           "TorchattacksPGD", "Transferred", "attack_curve", "audit", "auc",
           "curve_from_directions", "eer", "eer_accuracy", "fgsm_curve", "grid_mean",
           "independent_attacks", "keep_threshold", "lbfgs_vs_fgsm", "merge_results",
           "operating_point", "pgd_curve", "roc", "threshold_sweep"]
