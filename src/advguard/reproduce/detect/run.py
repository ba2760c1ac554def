"""The kNN detection experiment end to end (paper 003, SPEC Part B), as a resumable run
directory: train the attacked model, attack a slice of the test set (FGSM, L-BFGS, PGD), score
authentic inputs, adversarial inputs that fool the model and authentic errors with every
pre-processing × weighting through :class:`~advguard.detection.KNNBank`, and report
Table 2, ROC, threshold sweep and score densities; beyond the paper, an adaptive attacker that
knows the detector, and the detector on a MAT model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.detection import KNNBank, Preprocessing, Weighting
from advguard.evaluation import auc, eer_accuracy, keep_threshold, lbfgs_vs_fgsm
from advguard.io import file_sha256, read_metadata
from advguard.reports import write_html_report
from advguard.reports.detect import DetectResults, write_detect_report
from advguard.reproduce.detect.config import DetectConfig
from advguard.reproduce.detect.detectors import detector_table
from advguard.reproduce.detect.stages import (
    Detect,
    Queries,
    adversarial,
    bank_features,
    load,
    query_sets,
    trained_model,
)
from advguard.reproduce.rundir import open_run

Scores = dict[str, dict[str, dict[str, np.ndarray]]]  # pre-processing -> weighting -> set -> s
NEGATIVES = ["lbfgs", "fgsm", "aggregated", "errors", "pgd", "adaptive"]


def score_sets(d: Detect, bank: torch.Tensor, sets: dict[str, Queries],
               preprocessings: tuple[Preprocessing, ...] = tuple(Preprocessing),
               weightings: tuple[Weighting, ...] = tuple(Weighting)
               ) -> tuple[Scores, dict[str, float]]:
    """Scores of every query set for every pre-processing × weighting: one detector per
    pre-processing (bank = training split, true labels), one neighbour search per set feeding
    every weighting. Also the bank's memory per pre-processing (MB)."""
    scores: Scores = {}
    bank_mb: dict[str, float] = {}
    for pre in preprocessings:
        knn = KNNBank(k=d.cfg.k, preprocessing=pre, seed=d.cfg.seed).fit(bank, d.train_set.y)
        bank_mb[pre.value] = knn.index_.nbytes / 2 ** 20
        for name, q in sets.items():
            neighbours = knn.kneighbors(q.features)
            for w in weightings:
                scores.setdefault(pre.value, {}).setdefault(w.value, {})[name] = \
                    neighbours.scores(q.predicted, w)
    return scores, bank_mb


def metrics(scores: dict[str, np.ndarray], negatives: list[str], keep: float) -> dict[str, Any]:
    """Threshold (keeps ``keep`` of the calibration set), EER accuracy, AUC and the share each
    negative set loses at that threshold."""
    pos = scores["authentic"]
    threshold = keep_threshold(scores["calibration"], keep)
    out: dict[str, Any] = {"threshold": threshold,
                           "kept_authentic": float((pos >= threshold).mean())}
    for neg_name in negatives:
        parts = ["lbfgs", "fgsm"] if neg_name == "aggregated" else [neg_name]
        if not all(p in scores for p in parts):
            continue
        neg = np.concatenate([scores[p] for p in parts])
        if len(neg) == 0:
            continue
        out[neg_name] = {"eer_accuracy": eer_accuracy(pos, neg), "auc": auc(pos, neg),
                         "filtered": float((neg < threshold).mean()), "n": int(len(neg))}
    return out


def _on_mat_model(d: Detect) -> dict[str, Any]:
    """The detector (PCA + whitening, DW-kNN) on a mixed-MAT model at ε/2 and ε."""
    c = d.cfg
    strengths = tuple(round(c.eps * f, 6) for f in (0.5, 1.0))
    model = trained_model(d, "mat", strengths)
    bank = bank_features(d, model)
    sets, counts = query_sets(d, model, "mat", ("fgsm", "pgd"), bank)
    scores, _ = score_sets(d, bank, sets, (Preprocessing.PCA_WHITEN,), (Weighting.DWKNN,))
    return {"strengths": [c.eps * f for f in (0.5, 1.0)], "counts": counts,
            "test_accuracy": read_metadata(d.run.path("mat.safetensors"))["test_accuracy"],
            "pca-whiten/dwknn": metrics(scores["pca-whiten"]["dwknn"], ["fgsm", "pgd", "errors"],
                                        c.keep)}


def run_detect(config: DetectConfig, out: str | Path, *, progress: bool = True
               ) -> DetectResults:
    with open_run(config, out) as (cfg, run):
        return _run(load(cfg, run, progress), out)


def _run(d: Detect, out: str | Path) -> DetectResults:
    cfg, run = d.cfg, d.run
    model: nn.Module = trained_model(d, "model")
    bank = bank_features(d, model)
    sets, counts = query_sets(d, model, "model", ("fgsm", "lbfgs", "pgd", "adaptive"), bank)
    scores, bank_mb = score_sets(d, bank, sets)
    table = {pre: {w: metrics(scores[pre][w], NEGATIVES, cfg.keep) for w in scores[pre]}
             for pre in scores}
    lb = counts["lbfgs"]
    n_lb = cfg.lbfgs_queries
    lbfgs_adv = adversarial(d, model, "model", "lbfgs")
    results = DetectResults(
        dataset=cfg.dataset, model=cfg.model, k=cfg.k, eps=cfg.eps,
        threat="white-box attacks on the classifier; the detector is unknown to the attacker "
               "except for 'adaptive'",
        test_accuracy=read_metadata(run.path("model.safetensors"))["test_accuracy"],
        model_sha256=file_sha256(run.path("model.safetensors")),
        counts=counts, bank_mb=bank_mb, table=table,
        lbfgs_vs_fgsm={"lbfgs_success_rate": lb["fooled"] / max(lb["attacked"], 1),
                       "lbfgs_mean_l2": lb.get("mean_l2"),
                       "matched": lbfgs_vs_fgsm(model, d.test.x[:n_lb], d.test.y[:n_lb],
                                                lbfgs_adv["l2"].numpy(),
                                                lbfgs_adv["success"].numpy())},
        mat=_on_mat_model(d) if cfg.mat else None,
        **(detector_table(d, model, "model", cfg.detectors) if cfg.detectors else {}))
    write_detect_report(out, results, scores["pca-whiten"]["dwknn"])
    write_html_report(out)
    return results
