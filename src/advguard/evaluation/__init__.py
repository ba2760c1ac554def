"""Robustness curves (accuracy vs. strength) and their grid means (SPEC A6), detection metrics,
and the robustness audit (AutoAttack, independent attacks, gradient-masking checks)."""

from advguard.attacks import TorchattacksAPGD, TorchattacksPGD, Transferred
from advguard.evaluation.audit import (
    AUDIT_PGD,
    AuditPlan,
    AuditReport,
    audit,
    independent_attacks,
)
from advguard.evaluation.autoattack import AutoAttack, AutoAttackResult
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
from advguard.evaluation.outcomes import Outcomes, merge_results, read_run, run_shards
from advguard.evaluation.perturbation import lbfgs_vs_fgsm
from advguard.evaluation.robustness import (
    ThreatSetting,
    attack_curve,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
)

__all__ = ["AUDIT_PGD", "AuditPlan", "AuditReport", "AutoAttack", "AutoAttackResult",
           "OperatingPoint", "Outcomes",
           "ThreatSetting", "TorchattacksAPGD",
           "TorchattacksPGD", "Transferred", "attack_curve", "audit", "auc",
           "curve_from_directions", "eer", "eer_accuracy", "fgsm_curve", "grid_mean",
           "independent_attacks", "keep_threshold", "lbfgs_vs_fgsm", "merge_results",
           "operating_point", "pgd_curve", "read_run", "roc", "run_shards", "threshold_sweep"]
