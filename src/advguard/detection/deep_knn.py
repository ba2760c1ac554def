"""Deep k-nearest neighbours (Papernot & McDaniel 2018, "Deep k-nearest neighbors: towards
confident, interpretable and robust deep learning").

At every layer read, the k nearest bank entries (training set, true labels) of the input's
features, unit-normalised (cosine neighbours, as the authors' LSH search). The nonconformity of
a candidate class j is ``α(x, j) = Σ_ℓ |{neighbours at layer ℓ whose label ≠ j}|``. A
calibration split held out of the bank gives the nonconformities of its true labels,
``A = {α(xᵢ, yᵢ)}``; the conformal p-value of class j is ``|{α ∈ A : α ≥ α(x, j)}| / |A|``.
The score is the p-value of the class the *model* predicts — the DkNN's credibility of the
model's answer (their credibility when the DkNN's own prediction and the model's agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advguard import options
from advguard.attacks import Loss
from advguard.detection.adaptive import CentroidPull, SoftNeighbours, pick_surrogate
from advguard.detection.base import Chunk, Detector, Features
from advguard.detection.index import FeatureIndex
from advguard.errors import InputError
from advguard.options import option


@dataclass(frozen=True)
class DeepKNNOptions:
    k: int = option(75, "neighbours searched at every layer (the paper's 75)")

    def __post_init__(self) -> None:
        options.check_int("k", self.k)


def unit(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


class DeepKNN(Detector):
    name = "dknn"
    Options = DeepKNNOptions
    surrogates = ("soft", "centroid")
    options: DeepKNNOptions

    @property
    def k(self) -> int:
        return self.options.k

    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> DeepKNN:
        self.indexes_: dict[str, FeatureIndex] = {}
        for features, labels in self._fitted_layers(chunks):
            for key, f in features.items():
                if key not in self.indexes_:
                    self.indexes_[key] = FeatureIndex(f.shape[1], "flat", seed=self.seed)
                self.indexes_[key].add(unit(f), labels)
        self.classes_ = int(max(int(i.labels.max()) for i in self.indexes_.values())) + 1
        self.calibration_: np.ndarray | None = None
        return self

    def nonconformity(self, features: Features) -> np.ndarray:
        """``α(x, j)`` for every input and class, (N, classes)."""
        self._check_fitted()
        alpha = None
        for key in self.fitted_keys_:
            _, labels = self.indexes_[key].search(unit(features[key]), self.k)
            agree = np.stack([(labels == c).sum(1) for c in range(self.classes_)], axis=1)
            alpha = (self.k - agree) if alpha is None else alpha + (self.k - agree)
        return np.asarray(alpha)

    def fit_held_out(self, features: Features, logits: np.ndarray, labels: np.ndarray,
                     images: Any = None, workers: int | None = None) -> None:
        """The calibration nonconformities ``A``: the true labels of the held-out split."""
        labels = np.asarray(labels, np.int64)
        if len(labels) == 0:
            raise InputError("Deep kNN needs a non-empty calibration split")
        alpha = self.nonconformity(features)
        self.calibration_ = np.sort(alpha[np.arange(len(labels)), labels])

    def p_values(self, features: Features) -> np.ndarray:
        """Conformal p-values of every class, (N, classes)."""
        if self.calibration_ is None:
            raise InputError("Deep kNN is not calibrated: fit with a calibration split held "
                             "out of the bank")
        alpha = self.nonconformity(features)
        a = self.calibration_
        # |{α' ∈ A : α' ≥ α}| = |A| − (number of α' < α)
        return (len(a) - np.searchsorted(a, alpha, side="left")) / len(a)

    def score_features(self, features: Features, logits: np.ndarray) -> np.ndarray:
        p = self.p_values(features)
        return p[np.arange(len(p)), np.asarray(logits).argmax(1)]

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, index in self.indexes_.items():
            out[f"index.{key}"] = torch.from_numpy(index.to_bytes())
            out[f"labels.{key}"] = torch.from_numpy(index.labels)
        if self.calibration_ is not None:
            out["calibration"] = torch.from_numpy(self.calibration_)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.indexes_ = {k: FeatureIndex.from_bytes(tensors[f"index.{k}"].numpy(),
                                                    tensors[f"labels.{k}"].numpy(), "flat")
                         for k in self.fitted_keys_}
        self.classes_ = int(max(int(i.labels.max()) for i in self.indexes_.values())) + 1
        self.calibration_ = tensors["calibration"].numpy() if "calibration" in tensors else None

    def centroids(self) -> dict[str, np.ndarray]:
        """Mean unit-normalised bank vector of every class at every layer."""
        out = {}
        for key, index in self.indexes_.items():
            bank, labels = index.vectors(), index.labels
            out[key] = np.stack([bank[labels == c].mean(0) for c in range(self.classes_)])
        return out

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        """Sitawarin & Wagner 2019's attacks on DkNN, in the unit-normalised feature space of
        every layer: ``"soft"`` (default), their soft count of the k neighbours
        (:class:`~advguard.detection.adaptive.SoftNeighbours`), the surrogate they made for
        the neighbour count; ``"centroid"``, their "mean" attack, ``CE(model(x), t) + weight ·
        Σ_ℓ ‖u_ℓ(x) − c_{ℓ,t}‖²`` with ``c_{ℓ,t}`` the mean of class t's normalised entries."""
        surrogate = pick_surrogate(self.surrogates, surrogate)
        self._check_fitted()
        unit_space = {k: _unit_tensor for k in self.indexes_}
        if surrogate == "soft":
            return SoftNeighbours(self.layers_, {k: (i.vectors(), i.labels)
                                                 for k, i in self.indexes_.items()},
                                  unit_space, self.k, weight, seed=self.seed)
        return CentroidPull(self.layers_, self.centroids(), unit_space, weight, per_dim=False)


def _unit_tensor(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f, dim=1)
