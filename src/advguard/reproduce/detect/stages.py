"""The detection experiment's stages (paper 003, SPEC B4): the attacked model, adversarial copies
of the query images per attack, and the query sets with their deep features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.attacks import LBFGS, PGD, Attack, random_targets
from advguard.attacks.registry import EVALUATION, attack_names, build_attack
from advguard.batching import batch_slices
from advguard.data import ImageSet, load_dataset, train_val_split
from advguard.detection import (
    CentroidPull,
    KNNBank,
    extract_features,
    layer_key,
    resolve_layer,
)
from advguard.models import accuracy, build_model
from advguard.reproduce.detect.config import ResolvedDetectConfig
from advguard.reproduce.rundir import RunDir
from advguard.training import StrengthMix, train

ATTACK_BATCH, LBFGS_BATCH = 500, 100


@dataclass(frozen=True)
class Detect:
    """What every stage reads: the resolved config, the run directory and the data."""

    cfg: ResolvedDetectConfig
    run: RunDir
    train_set: ImageSet
    val: ImageSet
    test: ImageSet  # the query images
    progress: bool = True


def load(cfg: ResolvedDetectConfig, run: RunDir, progress: bool) -> Detect:
    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download,
                        limit=cfg.train_limit)
    tr, va = train_val_split(len(full), min(cfg.val_size, len(full) // 5), cfg.seed)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download)
    return Detect(cfg, run, full.subset(tr), full.subset(va),
                  test.subset(slice(0, cfg.queries)), progress)


def trained_model(d: Detect, name: str, strengths: tuple[float, ...] = ()) -> nn.Module:
    """The attacked model (white-box FGSM training at ``strengths``; none: clean), cached."""
    c = d.cfg

    def compute() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(c.seed)
        model = build_model(c.model, c.dataset)
        result = train(model, d.train_set, StrengthMix(strengths), None,
                       c.train_config(),
                       val=d.val, state_path=d.run.path(f"{name}.state.pt"),
                       progress=d.progress, desc=name)
        acc = accuracy(model, d.test.x, d.test.y, device=c.device)
        return model.eval(), {"arch": c.model, "dataset": c.dataset,
                              "strengths": list(strengths), "test_accuracy": acc,
                              "train_seconds": result.seconds}

    return d.run.model(name, compute, cleanup=[f"{name}.state.pt"])[0]


def bank_features(d: Detect, model: nn.Module) -> torch.Tensor:
    """Deep features of the training split: the bank every detector indexes."""
    return extract_features(model, d.train_set.x, None, device=d.cfg.device,
                            progress=d.progress)[0]


def adversarial(d: Detect, model: nn.Module, name: str, attack: str,
                bank: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Adversarial copies of the query images (cached): ``x`` and, for L-BFGS, success and L2.
    ``attack``: a registered evaluation attack (L∞, ε and steps of the run), ``lbfgs`` (the
    paper's) or ``adaptive`` (which needs the ``bank`` features to aim at)."""
    c, x, y = d.cfg, d.test.x, d.test.y

    def craft(attack_: Attack, targets: torch.Tensor) -> torch.Tensor:
        return attack_.craft_dataset(model, x, targets, c.eps, batch_size=ATTACK_BATCH,
                                     device=c.device)

    def compute() -> dict[str, torch.Tensor]:
        if attack in attack_names(EVALUATION, "linf"):  # fgsm, pgd or any other registered
            return {"x": craft(build_attack(attack, "linf", steps=c.pgd_steps, seed=c.seed), y)}
        if attack == "lbfgs":
            n = c.lbfgs_queries
            parts = [LBFGS(seed=c.seed + sl.start).run(model, x[:n][sl], y[:n][sl])
                     for sl in batch_slices(n, LBFGS_BATCH)]
            return {"x": torch.cat([p.x_adv for p in parts]),
                    "success": torch.cat([p.success for p in parts]),
                    "l2": torch.cat([p.l2 for p in parts])}
        if attack == "adaptive" and bank is not None:
            return {"x": adaptive_attack(d, model, bank)}
        raise ValueError(f"unknown attack {attack!r}")

    return d.run.tensors(f"{name}-{attack}", compute)


def adaptive_attack(d: Detect, model: nn.Module, bank: torch.Tensor) -> torch.Tensor:
    """Targeted PGD toward a random class that also pulls the input's PCA-whitened deep features
    onto that class's bank centroid: an attacker who knows the detector."""
    c = d.cfg
    knn = KNNBank(k=c.k, preprocessing="pca-whiten", seed=c.seed).fit(bank, d.train_set.y)
    spec = resolve_layer(model, None)  # the bank's layer (bank_features)
    key = layer_key(spec)
    pull = CentroidPull([spec], {key: knn.class_centroids()},
                        {key: knn.preprocessor_.transform_tensor}, c.adaptive_weight)
    target = random_targets(d.test.y, int(d.train_set.y.max()) + 1, c.seed)
    attack = PGD(steps=c.pgd_steps, random_start=False, loss=pull, targeted=True)
    return attack.craft_dataset(model, d.test.x, target, c.eps, batch_size=ATTACK_BATCH,
                                device=c.device)


@dataclass(frozen=True)
class Queries:
    """Deep features, predictions and labels of one set of inputs."""

    features: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray

    def mask(self, keep: np.ndarray) -> Queries:
        return Queries(self.features[keep], self.predicted[keep], self.labels[keep])


def queries(d: Detect, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Queries:
    f, p = extract_features(model, x, None, device=d.cfg.device)
    return Queries(f.numpy(), p.numpy(), y.numpy())


def query_sets(d: Detect, model: nn.Module, name: str, attacks: tuple[str, ...],
               bank: torch.Tensor) -> tuple[dict[str, Queries], dict[str, Any]]:
    """Query sets (authentic, errors, calibration, fooling adversarial inputs per attack) and
    their counts."""
    x, y = d.test.x, d.test.y
    clean = queries(d, model, x, y)
    right = clean.predicted == clean.labels
    val = queries(d, model, d.val.x, d.val.y)
    sets = {"authentic": clean.mask(right), "errors": clean.mask(~right),
            "calibration": val.mask(val.predicted == val.labels)}
    counts: dict[str, Any] = {"authentic": int(right.sum()), "errors": int((~right).sum())}
    for attack in attacks:
        adv = adversarial(d, model, name, attack, bank)
        n = len(adv["x"])
        q = queries(d, model, adv["x"], y[:n])
        # only inputs the model classified correctly and the attack made it misclassify
        fooled = (q.predicted != q.labels) & right[:n]
        if "success" in adv:
            fooled &= adv["success"].numpy()
        sets[attack] = q.mask(fooled)
        counts[attack] = {"attacked": int(right[:n].sum()), "fooled": int(fooled.sum()),
                          "failed": int(right[:n].sum() - fooled.sum())}
        if "l2" in adv:
            ok = adv["success"].numpy() & right[:n]
            counts[attack]["mean_l2"] = float(adv["l2"].numpy()[ok].mean()) if ok.any() else 0
    return sets, counts
