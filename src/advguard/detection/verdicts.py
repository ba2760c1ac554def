"""What a detector says: the neighbours of a query and the verdicts of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from advguard.detection.scores import Weighting, class_scores


@dataclass(frozen=True)
class Neighbours:
    """The k nearest bank entries of each query: squared L2 distances and labels (Q, k),
    nearest first (label −1 where FAISS found fewer than k)."""

    sq_distances: np.ndarray
    labels: np.ndarray

    def scores(self, classes: np.ndarray | torch.Tensor,
               weighting: str | Weighting) -> np.ndarray:
        """``s(q, classes[q])`` under ``weighting`` (SPEC B3)."""
        return class_scores(self.sq_distances, self.labels, np.asarray(classes), weighting)


@dataclass(frozen=True)
class Verdicts:
    """What the detector says of a batch of inputs (SPEC B6): the model's class and class
    probabilities, the kNN score of that class, whether the input lies farther from the bank
    than held-out clean images do (``unlike``, when the detector has a distance limit), and
    whether the prediction is trusted (``score ≥ offset_`` and not ``unlike``)."""

    predicted: np.ndarray  # (N,) int
    probabilities: np.ndarray  # (N, classes) float
    scores: np.ndarray  # (N,) in [0, 1]
    trusted: np.ndarray  # (N,) bool
    threshold: float
    unlike: np.ndarray | None = None  # (N,) bool: unlike any training image

    def rows(self, start: int, end: int) -> Verdicts:
        """The verdicts of inputs ``start`` to ``end`` (exclusive)."""
        return Verdicts(self.predicted[start:end], self.probabilities[start:end],
                        self.scores[start:end], self.trusted[start:end], self.threshold,
                        None if self.unlike is None else self.unlike[start:end])
