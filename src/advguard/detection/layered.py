"""The paper's kNN score at several layers (paper 003 studies hidden layers one at a time):
one :class:`~advguard.detection.KNNDetector` bank per layer, the same k, weighting and
pre-processing; the score is the mean of the per-layer scores, and
:meth:`LayeredKNN.layer_scores` gives each layer's own, so the method can be compared with
itself across depth."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from advguard.attacks import Loss
from advguard.detection.adaptive import CentroidPull, SoftNeighbours, pick_surrogate
from advguard.detection.base import Chunk, Detector, Features
from advguard.detection.detector import KNNDetector
from advguard.detection.options import KNNOptions
from advguard.detection.preprocessing import Preprocessing, parse_preprocessing
from advguard.detection.scores import Weighting, parse_weighting


class LayeredKNN(Detector):
    name = "knn-layers"
    surrogates = ("centroid", "soft")

    def __init__(self, layers: tuple[str, ...] | None = None, keep: float = KNNOptions.keep, *,
                 k: int = KNNOptions.k, weighting: str | Weighting = KNNOptions.weighting,
                 preprocessing: str | Preprocessing = KNNOptions.preprocessing,
                 **kwargs: Any) -> None:
        super().__init__(layers, keep, **kwargs)
        self.knn = KNNOptions(k=k, weighting=parse_weighting(weighting),
                              preprocessing=parse_preprocessing(preprocessing), keep=keep)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.knn.k, "weighting": self.knn.weighting.value,
                "preprocessing": self.knn.preprocessing.value}

    def _layer_detector(self) -> KNNDetector:
        return KNNDetector(k=self.knn.k, weighting=self.knn.weighting,
                           preprocessing=self.knn.preprocessing, keep=self.keep,
                           seed=self.seed, chunk_size=self.chunk_size)

    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> LayeredKNN:
        held = list(self._fitted_layers(chunks))  # one pass over the data for every layer
        self.detectors_ = {key: self._layer_detector().fit_feature_chunks(
            (f[key], y) for f, y in held) for key in self.fitted_keys_}
        return self

    def layer_scores(self, features: Features, predicted: np.ndarray) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {key: det.score_features(features[key], predicted)
                for key, det in self.detectors_.items()}

    def score_features(self, features: Features, predicted: np.ndarray) -> np.ndarray:
        return np.mean(list(self.layer_scores(features, predicted).values()), axis=0)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{key}/{name}": t for key, det in self.detectors_.items()
                for name, t in det.state().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.detectors_ = {}
        for key in self.fitted_keys_:
            det = self._layer_detector()
            det.load_state({n[len(key) + 1:]: t for n, t in tensors.items()
                            if n.startswith(key + "/")}, key)
            self.detectors_[key] = det

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        """``"centroid"`` (default): the kNN detector's :class:`~advguard.detection.FeaturePull`
        at every layer — targeted cross-entropy plus, per layer, the squared distance of the
        pre-processed features to the target class's centroid (divided by the dimension),
        summed over the layers; ``"soft"``: the soft neighbour count
        (:class:`~advguard.detection.adaptive.SoftNeighbours`) in every layer's space."""
        surrogate = pick_surrogate(self.surrogates, surrogate)
        self._check_fitted()
        transforms = {k: d.preprocessor_.transform_tensor for k, d in self.detectors_.items()}
        if surrogate == "soft":
            return SoftNeighbours(self.layers_, {k: (d.index_.vectors(), d.index_.labels)
                                                 for k, d in self.detectors_.items()},
                                  transforms, self.knn.k, weight, seed=self.seed)
        return CentroidPull(self.layers_,
                            {k: d.class_centroids() for k, d in self.detectors_.items()},
                            transforms, weight, per_dim=True)
