"""Feature pre-processing fitted on the labelled bank only (SPEC B2): none, l2, pca-whiten."""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from advguard.errors import InputError, parse_choice


class Preprocessing(str, Enum):
    NONE = "none"
    L2 = "l2"
    PCA_WHITEN = "pca-whiten"


def parse_preprocessing(value: str | Preprocessing) -> Preprocessing:
    return parse_choice(Preprocessing, value, "pre-processing")


RELATIVE_VARIANCE_FLOOR = 1e-6  # PCA components below this share of the largest are dropped


class Preprocessor:
    """``fit(bank)`` then ``transform(features)``; PCA whitening is scikit-learn's ``PCA(whiten=
    True)`` (≤ 256 components), kept as plain arrays so it saves without pickling."""

    def __init__(self, kind: str | Preprocessing = Preprocessing.NONE,
                 max_components: int = 256) -> None:
        self.kind = parse_preprocessing(kind)
        self.max_components = max_components

    def fit(self, features: np.ndarray, seed: int = 0) -> Preprocessor:
        if self.kind is Preprocessing.PCA_WHITEN:
            from sklearn.decomposition import PCA

            n = min(self.max_components, features.shape[1], features.shape[0])
            pca = PCA(n_components=n, whiten=True, random_state=seed).fit(features)
            # components without variance (dead ReLU units, a rank-deficient bank) are dropped:
            # whitening would divide them by ~0 and let them decide every distance
            var = pca.explained_variance_
            kept = var > RELATIVE_VARIANCE_FLOOR * max(float(var.max()), 1e-30)
            self.mean_ = pca.mean_.astype(np.float32)
            self.components_ = pca.components_[kept].astype(np.float32)
            self.scale_ = np.sqrt(var[kept]).astype(np.float32)
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        f = np.ascontiguousarray(features, dtype=np.float32)
        if self.kind is Preprocessing.L2:
            norms = np.linalg.norm(f, axis=1, keepdims=True)
            return f / np.maximum(norms, 1e-12)
        if self.kind is Preprocessing.PCA_WHITEN:
            if not hasattr(self, "components_"):
                raise InputError("pca-whiten pre-processing used before fit")
            z = (f - self.mean_) @ self.components_.T / np.maximum(self.scale_, 1e-12)
            return np.ascontiguousarray(z, dtype=np.float32)
        return f

    def transform_tensor(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` in torch, differentiable (for attacks that know the detector)."""
        if self.kind is Preprocessing.L2:
            return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.kind is Preprocessing.PCA_WHITEN:
            if not hasattr(self, "components_"):
                raise InputError("pca-whiten pre-processing used before fit")
            mean, comps, scale = (torch.as_tensor(a, device=features.device)
                                  for a in (self.mean_, self.components_, self.scale_))
            return (features - mean) @ comps.T / scale
        return features

    def state(self) -> dict[str, np.ndarray]:
        if self.kind is not Preprocessing.PCA_WHITEN:
            return {}
        return {"mean": self.mean_, "components": self.components_, "scale": self.scale_}

    def load_state(self, state: dict[str, np.ndarray]) -> Preprocessor:
        if self.kind is Preprocessing.PCA_WHITEN:
            self.mean_, self.components_, self.scale_ = (state["mean"], state["components"],
                                                         state["scale"])
        return self
