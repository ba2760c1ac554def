"""Every registered detector side by side on the same model, bank, calibration split and query
images: EER accuracy, AUROC and the share of each negative set caught at the operating point
that keeps ``keep`` of the correctly classified calibration images.

Negatives: the fooling images of L-BFGS, FGSM and PGD (crafted once, shared), each detector's
own adaptive attack (:meth:`~advguard.detection.Detector.adaptive_loss`, targeted PGD at the
same ε and steps, toward random classes), the model's own errors, and ``aggregated`` (L-BFGS and
FGSM, the paper's column). The adaptive attack's surrogate (:attr:`Detector.surrogates`) and
weight are chosen on validation images — the pair whose images are most often fooling *and*
trusted, weight 0 (targeted PGD alone) among them — never on the query images. The Mahalanobis
combination is reported twice: fitted on clean and noisy calibration images (no attack seen),
and fitted on clean and FGSM images of the calibration split (``mahalanobis-fgsm``: an attack
seen, on validation images only; never the test attacks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.attacks import FGSM, PGD, random_targets
from advguard.attacks.base import num_classes
from advguard.detection import DETECTORS, Detector, KNNOptions, build_detector
from advguard.evaluation import auc, eer_accuracy
from advguard.reproduce.detect.config import SEEN_ATTACK
from advguard.reproduce.detect.stages import ATTACK_BATCH, Detect, adversarial

# the adaptive attack's detector-term weights tried (with every surrogate); 0 is targeted PGD
# alone, so the attack kept is never weaker than ignoring the detector (Tramèr et al. 2020)
ADAPTIVE_WEIGHTS = (0.0, 0.001, 0.01, 0.1, 1.0)
WEIGHT_IMAGES = 300  # validation images the weight is chosen on


def fit_detector(d: Detect, model: nn.Module, row: str) -> Detector:
    """The detector of a row of the table: a registered detector with the run's keep, seed and
    device (and its k, for the paper's kNN options), fitted on the bank and the calibration
    split; a ``NAME-fgsm`` row's also learns from FGSM images of the calibration split."""
    seen = row.endswith(SEEN_ATTACK) and row not in DETECTORS
    name = row[:-len(SEEN_ATTACK)] if seen else row
    settings: dict[str, Any] = {"keep": d.cfg.keep, "seed": d.cfg.seed, "device": d.cfg.device}
    if DETECTORS[name].Options is KNNOptions:  # the experiment's k is the paper's kNN's
        settings["k"] = d.cfg.k
    det = build_detector(name, **settings).fit(
        model, d.train_set.x, d.train_set.y, x_calibration=d.val.x, y_calibration=d.val.y,
        progress=d.progress)
    if seen:
        x, y = d.val.x, d.val.y
        adv = FGSM().craft_dataset(model, x, y, d.cfg.eps, batch_size=ATTACK_BATCH,
                                   device=d.cfg.device)
        clean_f, logits = det.features(x)
        adv_f, adv_logits = det.features(adv)
        right = (logits.argmax(1) == y).numpy()
        fooled = right & (adv_logits.argmax(1) != y).numpy()
        det.fit_seen_attack({k: v[right] for k, v in clean_f.items()},
                            {k: v[fooled] for k, v in adv_f.items()},
                            f"clean and FGSM (ε = {d.cfg.eps:.4g}) calibration images")
        det.set_threshold(x, y)
    return det


def adaptive_images(d: Detect, model: nn.Module, det: Detector, x: torch.Tensor,
                    y: torch.Tensor, weight: float, surrogate: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, target classes)``: targeted PGD with the detector's own loss."""
    classes = num_classes(model, x[:1].to(d.cfg.device))
    targets = random_targets(y, classes, d.cfg.seed)
    attack = PGD(steps=d.cfg.pgd_steps, random_start=False, targeted=True)  # λ = 0: plain PGD
    if weight:
        attack = replace(attack, loss=det.adaptive_loss(weight, surrogate))
    return attack.craft_dataset(model, x, targets, d.cfg.eps, batch_size=ATTACK_BATCH,
                                device=d.cfg.device), targets


def choose_attack(d: Detect, model: nn.Module, det: Detector
                  ) -> tuple[str, float, dict[str, dict[str, float]]]:
    """``(surrogate, weight, tried)``: the share of validation images the adaptive attack
    makes fooling and trusted, for each of the detector's surrogates and each weight (weight
    0, targeted PGD alone, tried once, under ``"none"``); the best pair is kept."""
    x, y = d.val.x[:WEIGHT_IMAGES], d.val.y[:WEIGHT_IMAGES]
    pairs = [("none", 0.0)] + [(s, w) for s in det.surrogates for w in ADAPTIVE_WEIGHTS if w]
    tried: dict[str, dict[str, float]] = {}
    best = ("none", 0.0, -1.0)  # ties keep the earlier: PGD alone, then the lower weight
    for surrogate, w in pairs:
        adv, targets = adaptive_images(d, model, det, x, y, w,
                                       None if surrogate == "none" else surrogate)
        predicted, scores = det.inspect(adv)
        share = float(((predicted == targets.numpy())
                       & (scores >= float(det.offset_ or 0))).mean())
        tried.setdefault(surrogate, {})[str(w)] = share
        if share > best[2]:
            best = (surrogate, w, share)
    return (det.surrogates[0] if best[0] == "none" else best[0]), best[1], tried


def detector_table(d: Detect, model: nn.Module, model_name: str,
                   names: tuple[str, ...]) -> dict[str, Any]:
    """``{"detectors": {name: {negative: metrics}}, "details": {name: ...}}``."""
    x, y = d.test.x, d.test.y
    crafted = {a: adversarial(d, model, model_name, a) for a in ("fgsm", "lbfgs", "pgd")}
    table: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name in names:
        det = fit_detector(d, model, name)
        predicted, clean = det.inspect(x)
        right = predicted == y.numpy()
        negatives: dict[str, np.ndarray] = {"errors": clean[~right]}
        for attack, adv in crafted.items():
            n = len(adv["x"])
            p, s = det.inspect(adv["x"])
            fooled = right[:n] & (p != y[:n].numpy())
            if "success" in adv:
                fooled &= adv["success"].numpy()
            negatives[attack] = s[fooled]
        surrogate, weight, tried = choose_attack(d, model, det)
        adv_x, targets = adaptive_images(d, model, det, x, y, weight, surrogate)
        p, s = det.inspect(adv_x)
        negatives["adaptive"] = s[right & (p == targets.numpy())]
        negatives["aggregated"] = np.concatenate([negatives["lbfgs"], negatives["fgsm"]])
        threshold = float(det.offset_ or 0)
        positives = clean[right]
        table[name] = {neg: _metrics(positives, s_neg, threshold)
                       for neg, s_neg in negatives.items() if len(s_neg)}
        details[name] = {
            "layers": det.layer_keys,
            "threshold": threshold, "keep": d.cfg.keep,
            "kept_authentic": float((positives >= threshold).mean()),
            "adaptive_surrogate": surrogate if weight else "none", "adaptive_weight": weight,
            "adaptive_on_validation": tried,
            "adaptive_fooled": int(len(negatives["adaptive"])),
            **({"fitted": det.fitted_meta()} if det.fitted_meta() else {}),
            "n": {neg: int(len(v)) for neg, v in negatives.items()}}
    return {"detectors": table, "detector_details": details}


def _metrics(positive: np.ndarray, negative: np.ndarray, threshold: float) -> dict[str, float]:
    return {"eer_accuracy": eer_accuracy(positive, negative), "auroc": auc(positive, negative),
            "caught_at_keep": float((negative < threshold).mean())}
