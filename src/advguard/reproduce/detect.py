"""The kNN detection experiment end to end (paper 003, SPEC Part B), as a resumable run
directory: train the attacked model, attack a slice of the test set (FGSM, L-BFGS, PGD), score
authentic inputs, adversarial inputs that fool the model and authentic errors with every
pre-processing × weighting, and report Table 2, ROC, threshold sweep and score densities; beyond
the paper, an adaptive attacker that knows the detector, and the detector on a MAT model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.attacks import LBFGS, PGD, check_strengths, eval_mode, fgsm
from advguard.data import dataset_info, load_dataset, train_val_split
from advguard.detection import Preprocessor, class_scores, extract_features
from advguard.detection.features import pool_features, resolve_layer
from advguard.detection.index import FeatureIndex
from advguard.evaluation import auc, eer_accuracy, keep_threshold
from advguard.io import load_tensors, read_metadata, save_tensors
from advguard.models import build_model, load_model, model_for, save_model
from advguard.reports.detect import write_detect_report
from advguard.reproduce.rundir import prepare_run_dir
from advguard.training import StrengthMix, TrainConfig, accuracy, train

log = logging.getLogger(__name__)

PREPROCESSINGS = ("none", "l2", "pca-whiten")
WEIGHTINGS = ("knn", "wknn", "dwknn")
DEFAULT_EPS = {"mnist": 0.2, "fashion-mnist": 0.2, "cifar10": 8 / 255, "cifar100": 8 / 255,
               "svhn": 8 / 255}


@dataclass
class DetectConfig:
    dataset: str = "mnist"
    model: str | None = None  # attacked architecture; None: the dataset's CNN (LeNet-5 / CIFAR)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    val_size: int = 5000  # calibration split (held out of the training file)
    train_limit: int | None = None
    queries: int = 2000  # first N test images are attacked and scored
    lbfgs_queries: int = 300  # of which the first N are attacked with L-BFGS
    k: int = 1000
    eps: float | None = None  # FGSM/PGD strength; None: 0.2 (MNIST) or 8/255
    pgd_steps: int = 20
    keep: float = 0.98  # operating point: share of authentic inputs kept
    adaptive_weight: float = 1.0  # adaptive attack: weight of the feature-pull term
    mat: bool = True  # also run the detector on a mixed-MAT (white-box) model
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False

    def resolved(self) -> DetectConfig:
        info = dataset_info(self.dataset)
        eps = self.eps if self.eps is not None else DEFAULT_EPS[info.name]
        check_strengths(eps)
        return replace(self, dataset=info.name, eps=float(eps),
                       model=self.model or model_for(info.name, "crafter"))


@dataclass
class _Queries:
    """Features and predictions of one set of inputs."""

    features: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray


class DetectRun:
    def __init__(self, config: DetectConfig, out: Path, progress: bool = True) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.ckpt = out / "checkpoints"
        c = config
        full = load_dataset(c.dataset, "train", data_dir=c.data_dir, download=c.download,
                            limit=c.train_limit)
        tr, va = train_val_split(len(full), min(c.val_size, len(full) // 5), c.seed)
        self.train_set, self.val = full.subset(tr), full.subset(va)
        test = load_dataset(c.dataset, "test", data_dir=c.data_dir, download=c.download)
        self.test = test.subset(slice(0, c.queries))

    def model(self, name: str, strengths: tuple[float, ...] = ()) -> nn.Module:
        path = self.ckpt / f"{name}.safetensors"
        if path.exists():
            return load_model(path)[0]
        c = self.config
        torch.manual_seed(c.seed)
        model = build_model(c.model or "", c.dataset)
        result = train(model, self.train_set, StrengthMix(strengths), None,
                       TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                                   seed=c.seed, device=c.device),
                       val=self.val, state_path=self.ckpt / f"{name}.state.pt",
                       progress=self.progress, desc=name)
        acc = accuracy(model, self.test.x, self.test.y, device=c.device)
        save_model(path, model, arch=c.model or "", dataset=c.dataset, strengths=list(strengths),
                   test_accuracy=acc, train_seconds=result.seconds)
        (self.ckpt / f"{name}.state.pt").unlink(missing_ok=True)
        return model.eval()

    def adversarial(self, model: nn.Module, name: str, attack: str) -> dict[str, torch.Tensor]:
        """Adversarial copies of the query images (cached): ``x`` and, for L-BFGS, success and
        L2."""
        path = self.ckpt / f"{name}-{attack}.safetensors"
        if path.exists():
            return load_tensors(path)[0]
        c, x, y = self.config, self.test.x, self.test.y
        eps = float(c.eps or 0.0)
        out: dict[str, torch.Tensor]
        if attack == "fgsm":
            out = {"x": torch.cat([fgsm(model, x[s:s + 500], y[s:s + 500], eps)
                                   for s in range(0, len(x), 500)])}
        elif attack == "pgd":
            pgd = PGD(steps=c.pgd_steps, seed=c.seed)
            out = {"x": torch.cat([pgd(model, x[s:s + 500], y[s:s + 500], eps)
                                   for s in range(0, len(x), 500)])}
        elif attack == "lbfgs":
            n = c.lbfgs_queries
            parts = [LBFGS(seed=c.seed + s).run(model, x[s:min(s + 100, n)], y[s:min(s + 100, n)])
                     for s in range(0, n, 100)]
            out = {"x": torch.cat([p.x_adv for p in parts]),
                   "success": torch.cat([p.success for p in parts]),
                   "l2": torch.cat([p.l2 for p in parts])}
        else:
            out = {"x": self.adaptive_attack(model)}
        save_tensors(path, out)
        return out

    def adaptive_attack(self, model: nn.Module) -> torch.Tensor:
        """PGD toward a random target class that also pulls the input's (PCA-whitened) deep
        features onto the centroid of that class's bank features: an attacker who knows the
        detector."""
        c = self.config
        layer = resolve_layer(model, None)
        bank, _ = extract_features(model, self.train_set.x, layer, device=c.device)
        pre = Preprocessor("pca-whiten").fit(bank.numpy(), seed=c.seed)
        z_bank = pre.transform(bank.numpy())
        labels = self.train_set.y.numpy()
        classes = int(labels.max()) + 1
        centroids = torch.tensor(np.stack([z_bank[labels == k].mean(0) for k in range(classes)]))
        mean, comps, scale = (torch.tensor(v) for v in (pre.mean_, pre.components_, pre.scale_))
        module = dict(model.named_modules())[layer.name]
        x, y = self.test.x, self.test.y
        gen = torch.Generator().manual_seed(c.seed)
        target = (y + torch.randint(1, classes, (len(y),), generator=gen)) % classes
        eps = float(c.eps or 0.0)
        alpha = 2.5 * eps / c.pgd_steps
        out = []
        for s in range(0, len(x), 500):
            xb, tb = x[s:s + 500], target[s:s + 500]
            adv = xb.clone()
            for _ in range(c.pgd_steps):
                captured: list[torch.Tensor] = []

                def hook(_m: nn.Module, a: tuple[torch.Tensor, ...], o: torch.Tensor,
                         store: list[torch.Tensor] = captured) -> None:
                    store.append(a[0] if layer.inputs else o)

                handle = module.register_forward_hook(hook)
                try:
                    with eval_mode(model), torch.enable_grad():
                        adv.requires_grad_(True)
                        logits = model(adv)
                        feat = pool_features(captured[0])
                        z = (feat - mean) @ comps.T / scale
                        loss = (F.cross_entropy(logits, tb) + c.adaptive_weight *
                                (z - centroids[tb]).pow(2).sum(1).mean() / z.shape[1])
                        (grad,) = torch.autograd.grad(loss, adv)
                finally:
                    handle.remove()
                adv = adv.detach() - alpha * grad.sign()
                adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(0, 1)
            out.append(adv)
        return torch.cat(out)

    def queries(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> _Queries:
        f, p = extract_features(model, x, None, device=self.config.device)
        return _Queries(f.numpy(), p.numpy(), y.numpy())

    def score_sets(self, model: nn.Module, sets: dict[str, _Queries],
                   preprocessings: tuple[str, ...] = PREPROCESSINGS,
                   weightings: tuple[str, ...] = WEIGHTINGS) -> dict[str, dict[str, Any]]:
        """Scores of every query set for every pre-processing × weighting; the bank is the
        training split (true labels), searched once per pre-processing."""
        c = self.config
        bank, _ = extract_features(model, self.train_set.x, None, device=c.device,
                                   progress=self.progress)
        out: dict[str, dict[str, Any]] = {}
        for pre_name in preprocessings:
            pre = Preprocessor(pre_name).fit(bank.numpy(), seed=c.seed)
            index = FeatureIndex(pre.transform(bank.numpy()), self.train_set.y.numpy())
            out[pre_name] = {"bank_mb": index.nbytes / 2 ** 20}
            for set_name, q in sets.items():
                d2, labels = index.search(pre.transform(q.features), c.k)
                for w in weightings:
                    out[pre_name].setdefault(w, {})[set_name] = class_scores(
                        d2, labels, q.predicted, w)
        return out

    def analyse(self, model: nn.Module, name: str, attacks: tuple[str, ...]) -> dict[str, Any]:
        """Query sets (authentic, errors, fooling adversarial inputs per attack) and their
        scores."""
        x, y = self.test.x, self.test.y
        clean = self.queries(model, x, y)
        correct = clean.predicted == clean.labels
        val = self.queries(model, self.val.x, self.val.y)
        sets = {"authentic": _mask(clean, correct), "errors": _mask(clean, ~correct),
                "calibration": _mask(val, val.predicted == val.labels)}
        counts: dict[str, Any] = {"authentic": int(correct.sum()), "errors": int((~correct).sum())}
        for attack in attacks:
            adv = self.adversarial(model, name, attack)
            n = len(adv["x"])
            q = self.queries(model, adv["x"], y[:n])
            # only inputs the model classified correctly and the attack made it misclassify
            fooled = (q.predicted != q.labels) & correct[:n]
            if "success" in adv:
                fooled &= adv["success"].numpy()
            sets[attack] = _mask(q, fooled)
            counts[attack] = {"attacked": int(correct[:n].sum()), "fooled": int(fooled.sum()),
                              "failed": int(correct[:n].sum() - fooled.sum())}
            if "l2" in adv:
                ok = adv["success"].numpy() & correct[:n]
                counts[attack]["mean_l2"] = float(adv["l2"].numpy()[ok].mean()) if ok.any() else 0
        return {"counts": counts, "sets": sets}


def _mask(q: _Queries, m: np.ndarray) -> _Queries:
    return _Queries(q.features[m], q.predicted[m], q.labels[m])


def _metrics(scores: dict[str, np.ndarray], negatives: list[str], keep: float) -> dict[str, Any]:
    pos = scores["authentic"]
    threshold = keep_threshold(scores["calibration"], keep)
    out: dict[str, Any] = {"threshold": threshold,
                           "kept_authentic": float((pos >= threshold).mean())}
    for neg_name in negatives:
        neg = (np.concatenate([scores["lbfgs"], scores["fgsm"]]) if neg_name == "aggregated"
               else scores[neg_name])
        if len(neg) == 0:
            continue
        out[neg_name] = {"eer_accuracy": eer_accuracy(pos, neg), "auc": auc(pos, neg),
                         "filtered": float((neg < threshold).mean()), "n": int(len(neg))}
    return out


def lbfgs_vs_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lbfgs_l2: np.ndarray,
                  lbfgs_success: np.ndarray, rates: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
                  ) -> list[dict[str, float]]:
    """Perturbation size at matched success rates on the correctly classified ``x``: for each
    rate r, the mean L2 of the r share of images L-BFGS fools most cheaply, and the mean L2 of
    FGSM at the smallest ε (bisection) that fools a share r."""
    with torch.no_grad(), eval_mode(model):
        keep = (model(x).argmax(1) == y).numpy()
    x, y = x[keep], y[keep]
    l2 = np.sort(lbfgs_l2[keep][lbfgs_success[keep]])
    rows = []
    for rate in rates:
        need = int(np.ceil(rate * len(x)))
        if need == 0 or need > len(l2):
            continue
        lo, hi = 0.0, 1.0
        for _ in range(16):
            mid = (lo + hi) / 2
            with torch.no_grad(), eval_mode(model):
                fooled = model(fgsm(model, x, y, mid)).argmax(1) != y
            lo, hi = (lo, mid) if fooled.float().mean() >= rate else (mid, hi)
        adv = fgsm(model, x, y, hi)
        with torch.no_grad(), eval_mode(model):
            fooled = model(adv).argmax(1) != y
        if fooled.float().mean() < rate:
            continue  # FGSM cannot reach this rate even at eps = 1
        rows.append({"success_rate": rate, "lbfgs_mean_l2": float(l2[:need].mean()),
                     "fgsm_eps": hi,
                     "fgsm_mean_l2": float((adv - x).flatten(1).norm(dim=1)[fooled].mean())})
    return rows


def run_detect(config: DetectConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    cfg = prepare_run_dir(config, out)
    out = Path(out)
    run = DetectRun(cfg, out, progress)
    model = run.model("model")
    analysis = run.analyse(model, "model", ("fgsm", "lbfgs", "pgd", "adaptive"))
    scores = run.score_sets(model, analysis["sets"])
    negatives = ["lbfgs", "fgsm", "aggregated", "errors", "pgd", "adaptive"]
    table = {pre: {w: _metrics(scores[pre][w], negatives, cfg.keep) for w in WEIGHTINGS}
             for pre in PREPROCESSINGS}
    lb = analysis["counts"]["lbfgs"]
    lbfgs_rate = lb["fooled"] / max(lb["attacked"], 1)
    n_lb = cfg.lbfgs_queries
    lbfgs_adv = run.adversarial(model, "model", "lbfgs")
    results: dict[str, Any] = {
        "dataset": cfg.dataset, "model": cfg.model, "k": cfg.k, "eps": cfg.eps,
        "threat": "white-box attacks on the classifier; the detector is unknown to the attacker "
                  "except for 'adaptive'",
        "test_accuracy": read_metadata(run.ckpt / "model.safetensors")["test_accuracy"],
        "counts": analysis["counts"],
        "bank_mb": {pre: scores[pre]["bank_mb"] for pre in PREPROCESSINGS},
        "table": table,
        "lbfgs_vs_fgsm": {"lbfgs_success_rate": lbfgs_rate, "lbfgs_mean_l2": lb.get("mean_l2"),
                          "matched": lbfgs_vs_fgsm(model, run.test.x[:n_lb], run.test.y[:n_lb],
                                                   lbfgs_adv["l2"].numpy(),
                                                   lbfgs_adv["success"].numpy())},
    }
    if cfg.mat:
        strengths = tuple(cfg.eps * f for f in (0.5, 1.0)) if cfg.eps else ()
        mat_model = run.model("mat", tuple(round(s, 6) for s in strengths))
        mat = run.analyse(mat_model, "mat", ("fgsm", "pgd"))
        mat_scores = run.score_sets(mat_model, mat["sets"], ("pca-whiten",), ("dwknn",))
        results["mat"] = {
            "strengths": list(strengths), "counts": mat["counts"],
            "test_accuracy": read_metadata(run.ckpt / "mat.safetensors")["test_accuracy"],
            "pca-whiten/dwknn": _metrics(mat_scores["pca-whiten"]["dwknn"],
                                         ["fgsm", "pgd", "errors"], cfg.keep)}
    best = scores["pca-whiten"]["dwknn"]
    write_detect_report(out, results, best)
    return results
