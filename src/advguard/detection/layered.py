"""The paper's kNN score at several layers (paper 003 studies hidden layers one at a time): the
kNN detector reading up to ``most_layers`` layers by default instead of the last block alone,
its score the mean of the per-layer scores (:meth:`~advguard.detection.KNNDetector.layer_scores`
gives each layer's own, so the method can be compared with itself across depth)."""

from __future__ import annotations

from torch import nn

from advguard.detection.base import Detector
from advguard.detection.detector import KNNDetector
from advguard.detection.features import LayerSpec


class LayeredKNN(KNNDetector):
    name = "knn-layers"

    def resolve_layers(self, model: nn.Module) -> list[LayerSpec]:
        return Detector.resolve_layers(self, model)
