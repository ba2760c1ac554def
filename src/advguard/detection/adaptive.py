"""An attacker who knows the detector (beyond the paper): a PGD objective, not a loop of its own.

Targeted PGD toward a class t that also pulls the input's pre-processed deep features onto the
centroid of class t's bank entries, so the neighbours agree with the wrong prediction::

    PGD(loss=FeaturePull(detector), targeted=True, random_start=False)(model, x, t, eps)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advguard.detection.detector import KNNDetector
from advguard.detection.features import FeatureCapture


class FeaturePull:
    """``CE(model(x), t) + weight · ‖φ̃(x) − centroid_t‖² / d`` (batch means), φ̃ the detector's
    pre-processed features; descended by targeted PGD. Implements
    :class:`~advguard.attacks.Loss`."""

    def __init__(self, detector: KNNDetector, weight: float = 1.0) -> None:
        self.detector = detector
        self.layer = detector.layer_ if hasattr(detector, "layer_") else detector.layer
        self.centroids = torch.from_numpy(detector.class_centroids())
        self.weight = weight

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with FeatureCapture(model, self.layer) as cap:
            logits = model(x)
        z = self.detector.preprocessor_.transform_tensor(cap.features)
        pull = (z - self.centroids.to(z.device)[y]).pow(2).sum(1).mean() / z.shape[1]
        return F.cross_entropy(logits, y) + self.weight * pull, logits
