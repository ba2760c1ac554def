"""Detection metrics (SPEC B4): positives are correctly classified authentic inputs, negatives
one set of inputs to reject (adversarial inputs of one attack, or authentic errors).

A detector with score s trusts an input iff s ≥ threshold. TPR = share of positives kept,
FPR = share of negatives kept, FNR = 1 − TPR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from advguard.errors import InputError


def _check(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise InputError("detection metrics need at least one positive and one negative score")
    return pos, neg


def roc(positive_scores: np.ndarray, negative_scores: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve (scikit-learn's ``roc_curve``)."""
    pos, neg = _check(positive_scores, negative_scores)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, thr = roc_curve(labels, np.r_[pos, neg], drop_intermediate=False)
    return fpr, tpr, thr


def auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    pos, neg = _check(positive_scores, negative_scores)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def eer(positive_scores: np.ndarray, negative_scores: np.ndarray) -> tuple[float, float]:
    """``(equal error rate, threshold)``: the ROC point where FPR and FNR are closest, EER their
    mean there."""
    fpr, tpr, thr = roc(positive_scores, negative_scores)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fpr - fnr)))
    return float((fpr[i] + fnr[i]) / 2), float(thr[i])


def eer_accuracy(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Accuracy at the equal-error-rate threshold, ``1 − EER`` (the paper's Table 2 metric)."""
    return 1.0 - eer(positive_scores, negative_scores)[0]


def threshold_sweep(positive_scores: np.ndarray, negative_scores: np.ndarray,
                    thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR at each threshold (trust iff score ≥ threshold), the paper's Fig. 3."""
    pos, neg = _check(positive_scores, negative_scores)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1)
    return (pos >= t).mean(axis=1), (neg >= t).mean(axis=1)


def keep_threshold(positive_scores: np.ndarray, keep: float) -> float:
    """The threshold that keeps (score ≥ threshold) a share ``keep`` of the positives."""
    if not 0 < keep <= 1:
        raise InputError(f"keep must be in (0, 1], got {keep}")
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    if len(pos) == 0:
        raise InputError("no positive score to set a threshold from")
    return float(np.quantile(pos, 1 - keep, method="lower"))


KEEP = 0.98  # the paper's operating point: the share of authentic inputs kept (declared once)


@dataclass(frozen=True)
class OperatingPoint:
    keep: float  # share of authentic (positive) inputs kept
    threshold: float
    filtered: float  # share of negatives rejected at that threshold


def operating_point(positive_scores: np.ndarray, negative_scores: np.ndarray,
                    keep: float = KEEP) -> OperatingPoint:
    """The threshold that keeps ``keep`` of the positives, and the share of negatives it
    filters (the paper: keep > 98% authentic, filter > 40–50% adversarial)."""
    pos, neg = _check(positive_scores, negative_scores)
    threshold = keep_threshold(pos, keep)
    return OperatingPoint(float((pos >= threshold).mean()), threshold,
                          float((neg < threshold).mean()))
