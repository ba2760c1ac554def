"""How far an input lies from every training image (Sun et al. 2022, "Out-of-distribution
detection with deep nearest neighbors"): the squared L2 distance from its L2-normalised deep
features to the nearest normalised bank vector.

The kNN score asks whether an input's neighbours agree with its class; an input unlike any
training image — noise, a blank, another domain — can have neighbours that agree, but it is not
near them. The distance is measured on normalised features, not in the detector's PCA-whitened
space: whitening equalises every direction, and on CIFAR-10 it put blank and noise images as
close to the bank as test images are.
"""

from __future__ import annotations

import numpy as np

from advguard.detection.index import FeatureIndex


def _normalised(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


class Familiarity:
    """An exact index of the bank's normalised features: ``distance(features)``."""

    def __init__(self, dim: int) -> None:
        self.index = FeatureIndex(dim, "flat")

    def add(self, features: np.ndarray) -> None:
        self.index.add(_normalised(features), np.zeros(len(features), dtype=np.int64))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared distance of each row's normalised features to the nearest bank vector."""
        d2, _ = self.index.search(_normalised(features), 1)
        return d2[:, 0]

    def to_bytes(self) -> np.ndarray:
        return self.index.to_bytes()

    @classmethod
    def from_bytes(cls, data: np.ndarray, size: int) -> Familiarity:
        out = cls.__new__(cls)
        out.index = FeatureIndex.from_bytes(data, np.zeros(size, dtype=np.int64), "flat")
        return out
