"""An attacker who knows the detector (beyond the paper): a PGD objective, not a loop of its own.

Targeted PGD toward a class t that also pulls the input's pre-processed deep features onto the
centroid of class t's bank entries, so the neighbours agree with the wrong prediction::

    PGD(loss=FeaturePull(detector), targeted=True, random_start=False)(model, x, t, eps)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.detection.detector import KNNDetector
from advguard.detection.features import FeatureCapture, LayersCapture, LayerSpec


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


class CentroidPull:
    """``CE(model(x), t) + weight · Σ_ℓ ‖g_ℓ(f_ℓ(x)) − c_{ℓ,t}‖²`` (batch sums; each layer's
    term divided by its dimension with ``per_dim``): at every layer a multi-layer detector
    reads, its transform ``g_ℓ`` of the features pulled onto the target class's centroid
    ``c_{ℓ,t}`` in that space. Implements :class:`~advguard.attacks.Loss`."""

    def __init__(self, layers: list[LayerSpec], centroids: dict[str, np.ndarray],
                 transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                 weight: float = 1.0, per_dim: bool = True) -> None:
        self.layers, self.transforms, self.weight, self.per_dim = (layers, transforms, weight,
                                                                   per_dim)
        self.centroids = {k: torch.from_numpy(v) for k, v in centroids.items()}

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with LayersCapture(model, self.layers) as cap:
            logits = model(x)
        pull = torch.zeros((), device=x.device)
        for key, f in cap.features.items():
            z = self.transforms[key](f)
            d2 = (z - self.centroids[key].to(z.device)[y]).pow(2).sum()
            pull = pull + (d2 / z.shape[1] if self.per_dim else d2)
        return F.cross_entropy(logits, y, reduction="sum") + self.weight * pull, logits
