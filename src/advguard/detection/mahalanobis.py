"""The Mahalanobis detector (Lee, Lee, Lee & Shin 2018, "A simple unified framework for
detecting out-of-distribution samples and adversarial attacks").

At every layer read: class-conditional Gaussians with one shared (tied) covariance, fitted on the
bank (the training set, true labels), features average-pooled over space. The confidence score
of layer ℓ is ``M_ℓ(x) = max_c −(f_ℓ(x) − μ_{ℓ,c})ᵀ Σ_ℓ⁻¹ (f_ℓ(x) − μ_{ℓ,c})`` — the distance to
the *closest* class, as in the paper (not to the predicted one). Optional input pre-processing
moves ``x`` by ``noise`` against the gradient of that distance, per layer, before scoring.

The layers are combined by a logistic regression on their scores. What it is fitted on matters
and is recorded (``combined_on``): by default on the calibration split held out of the bank,
its clean images as positives and the same images with Gaussian noise as negatives — no attack
seen (the setting the paper calls "detecting unseen attacks" uses FGSM; this one sees none).
:meth:`Mahalanobis.fit_combination` fits it on any other positives and negatives, e.g.
adversarial examples crafted on a validation split; it must never see the test attacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import Dataset

from advguard.attacks import Loss
from advguard.data import as_dataset
from advguard.detection.adaptive import pick_surrogate
from advguard.detection.base import Chunk, Detector, Features
from advguard.detection.features import LayersCapture
from advguard.errors import InputError
from advguard.models import eval_mode
from advguard.options import option


@dataclass(frozen=True)
class MahalanobisOptions:
    noise: float = option(0.0, "input pre-processing step against the distance's gradient "
                               "(the paper's ε; 0: off)")
    combine_sigma: float = option(0.1, "σ of the Gaussian-noise copies the layer combination "
                                       "is fitted against")
    ridge: float = option(1e-6, "added to the tied covariance's diagonal")

    def __post_init__(self) -> None:
        for what in ("noise", "combine_sigma", "ridge"):
            value = getattr(self, what)
            if not 0.0 <= float(value) <= 1.0:
                raise InputError(f"Mahalanobis {what} must be in [0, 1], got {value!r}")


class Mahalanobis(Detector):
    name = "mahalanobis"
    Options = MahalanobisOptions
    surrogates = ("gaussian",)
    learns_attacks = True
    options: MahalanobisOptions

    # --- the Gaussians --------------------------------------------------------------------

    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> Mahalanobis:
        """One pass: per-class sums and the sum of outer products, in float64."""
        sums: dict[str, np.ndarray] = {}
        outer: dict[str, np.ndarray] = {}
        counts = np.zeros(0)
        for features, labels in self._fitted_layers(chunks):
            labels = labels.astype(np.int64)
            classes = max(int(labels.max()) + 1, len(counts))
            counts = np.pad(counts, (0, classes - len(counts)))
            counts += np.bincount(labels, minlength=classes)
            for key, f in features.items():
                f64 = f.astype(np.float64)
                s = sums.setdefault(key, np.zeros((classes, f.shape[1])))
                s = sums[key] = np.pad(s, ((0, classes - len(s)), (0, 0)))
                np.add.at(s, labels, f64)
                outer[key] = outer.get(key, 0) + f64.T @ f64
        if (counts == 0).any():
            raise InputError("every class must occur in the bank (classes "
                             f"{np.flatnonzero(counts == 0).tolist()} have no example)")
        self.means_: dict[str, np.ndarray] = {}
        self.precisions_: dict[str, np.ndarray] = {}
        n = counts.sum()
        for key in self.fitted_keys_:
            mu = sums[key] / counts[:, None]
            cov = (outer[key] - (mu * counts[:, None]).T @ mu) / n  # Σ_c Σ_i (f−μ_c)(f−μ_c)ᵀ / N
            cov += self.options.ridge * np.eye(len(cov))
            self.means_[key] = mu.astype(np.float32)
            self.precisions_[key] = np.linalg.pinv(cov, hermitian=True).astype(np.float32)
        self.combination_: tuple[np.ndarray, float] | None = None
        self.combined_on_ = "none (the deepest layer alone)"
        return self

    def layer_scores(self, features: Features) -> np.ndarray:
        """``M_ℓ`` of every input at every layer, (N, layers), in the fitted layers' order."""
        self._check_fitted()
        cols = []
        for key in self.fitted_keys_:
            f = torch.from_numpy(np.asarray(features[key], np.float32))
            cols.append(self._score(key, f).numpy())
        return np.stack(cols, axis=1)

    def _score(self, key: str, f: torch.Tensor, target: torch.Tensor | None = None
               ) -> torch.Tensor:
        """``−d²`` to the closest class mean (or to ``target``'s), differentiable in ``f``."""
        mu = torch.from_numpy(self.means_[key]).to(f.device)
        precision = torch.from_numpy(self.precisions_[key]).to(f.device)
        centred = f[:, None, :] - mu[None]  # (N, C, D)
        d2 = torch.einsum("ncd,de,nce->nc", centred, precision, centred)
        if target is not None:
            return -d2.gather(1, target.view(-1, 1)).squeeze(1)
        return -d2.min(dim=1).values

    # --- the combination ------------------------------------------------------------------

    def fit_combination(self, positive: Features, negative: Features, on: str) -> None:
        """Logistic regression of the layer scores: ``positive`` (trusted) vs ``negative``."""
        pos, neg = self.layer_scores(positive), self.layer_scores(negative)
        x = np.concatenate([pos, neg])
        mean, std = x.mean(0), x.std(0) + 1e-12
        lr = LogisticRegression(max_iter=1000).fit((x - mean) / std,
                                                   np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        w = lr.coef_[0] / std
        self.combination_ = (w.astype(np.float64), float(lr.intercept_[0] - w @ mean))
        self.combined_on_ = on

    def fit_seen_attack(self, clean: Features, adversarial: Features, on: str) -> None:
        """The combination fitted on ``clean`` positives and ``adversarial`` negatives."""
        self.fit_combination(clean, adversarial, on)

    def fit_held_out(self, features: Features, logits: np.ndarray, labels: np.ndarray,
                     images: Any = None, workers: int | None = None) -> None:
        """The combination. Positives: the held-out images the model classifies right;
        negatives: the same images with Gaussian noise of σ = ``combine_sigma`` (no attack
        seen) — drawn at once for a tensor of images, as they are read for a Dataset. Without
        ``images`` the deepest layer's score stands alone."""
        if images is None:
            return
        if isinstance(images, torch.Tensor):
            gen = torch.Generator().manual_seed(self.seed)
            noisy_images = (images + self.options.combine_sigma * torch.randn(images.shape,
                                                                      generator=gen)).clamp(0, 1)
            noisy = self.features(noisy_images)[0]
        else:
            noisy_data = Noisy(images, self.options.combine_sigma, self.seed)
            parts = [f for f, _, _ in self._stream(noisy_data, workers)]
            noisy = {k: np.concatenate([f[k] for f in parts]) for k in features}
        right = np.asarray(logits).argmax(1) == labels
        self.fit_combination({k: v[right] for k, v in features.items()},
                             {k: v[right] for k, v in noisy.items()},
                             f"clean and Gaussian-noise (σ = {self.options.combine_sigma:g}) "
                             "calibration images")

    def score_features(self, features: Features, logits: np.ndarray) -> np.ndarray:
        scores = self.layer_scores(features)
        if self.combination_ is None:
            return scores[:, -1]
        w, b = self.combination_
        return scores.astype(np.float64) @ w + b

    # --- input pre-processing (the paper's, optional) --------------------------------------

    def features(self, x: torch.Tensor) -> tuple[Features, torch.Tensor]:
        features, logits = super().features(x)
        if self.options.noise == 0.0:
            return features, logits
        return {key: self._preprocessed(x, key) for key in self.fitted_keys_}, logits

    def _preprocessed(self, x: torch.Tensor, key: str) -> np.ndarray:
        """Layer ``key``'s features at ``x − noise · sign(∇ₓ d²)``, which lowers the distance to
        the closest class (in-distribution inputs move more than others, as the paper finds)."""
        spec = self.layers_[self.layer_keys.index(key)]
        out = []
        with eval_mode(self.model_), LayersCapture(self.model_, [spec]) as cap:
            for start in range(0, len(x), self.batch_size):
                xb = x[start:start + self.batch_size].to(self.device).requires_grad_(True)
                with torch.enable_grad():
                    self.model_(xb)
                    (grad,) = torch.autograd.grad(self._score(key, cap.features[key]).sum(), xb)
                with torch.no_grad():
                    self.model_((xb + self.options.noise * grad.sign()).clamp(0, 1))
                    out.append(cap.features[key].float().cpu())
        return torch.cat(out).numpy()

    # --- persistence and the adaptive attack ----------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"mean.{k}": torch.from_numpy(v) for k, v in self.means_.items()}
        out.update({f"precision.{k}": torch.from_numpy(v) for k, v in self.precisions_.items()})
        if self.combination_ is not None:
            out["combine.w"] = torch.from_numpy(self.combination_[0])
            out["combine.b"] = torch.tensor([self.combination_[1]], dtype=torch.float64)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.means_ = {k: tensors[f"mean.{k}"].numpy() for k in self.fitted_keys_}
        self.precisions_ = {k: tensors[f"precision.{k}"].numpy() for k in self.fitted_keys_}
        self.combination_ = ((tensors["combine.w"].numpy(), float(tensors["combine.b"][0]))
                             if "combine.w" in tensors else None)

    def fitted_meta(self) -> dict[str, Any]:
        return {"combined_on": self.combined_on_}

    def load_fitted_meta(self, meta: dict[str, Any]) -> None:
        self.combined_on_ = meta.get("combined_on", "unknown")

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        pick_surrogate(self.surrogates, surrogate)
        return MahalanobisPull(self, weight)


class Noisy(Dataset):
    """``data`` with seeded Gaussian noise of σ ``sigma`` on every image (clipped to [0, 1]);
    image ``i`` always gets the same noise."""

    def __init__(self, data: Any, sigma: float, seed: int) -> None:
        self.data, self.sigma, self.seed = as_dataset(data)[0], sigma, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.data[i]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return (x + self.sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1), y


class MahalanobisPull:
    """``CE(model(x), t) + weight · Σ_ℓ d²_ℓ(f_ℓ(x), μ_{ℓ,t}) / D_ℓ`` (batch sums): targeted PGD
    descends it, so the input is classified as ``t`` *and* sits near class ``t``'s Gaussian at
    every layer the detector reads — the detector's own term, differentiated."""

    def __init__(self, detector: Mahalanobis, weight: float = 1.0) -> None:
        self.detector, self.weight = detector, weight

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = self.detector
        with LayersCapture(model, det.layers_) as cap:
            logits = model(x)
        pull = sum(-det._score(key, f, y).sum() / f.shape[1]
                   for key, f in cap.features.items())
        return F.cross_entropy(logits, y, reduction="sum") + self.weight * pull, logits
