"""Scores of a class among the k nearest neighbours (SPEC B3).

``s(q, c) = Σ_i w_i 1{c_i = c} / Σ_i w_i`` over the k neighbours ranked i = 1..k, with
``knn``: w_i = 1, ``wknn``: w_i = 1/i, ``dwknn``: w_i = 1/d(q, x_i)² (L2 distance d). If some
neighbours lie at distance 0, they alone vote, with equal weight (the limit of 1/d² as d → 0).
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from advguard.errors import InputError, parse_choice


class Weighting(str, Enum):
    KNN = "knn"
    WKNN = "wknn"
    DWKNN = "dwknn"


def parse_weighting(value: str | Weighting) -> Weighting:
    return parse_choice(Weighting, value, "weighting")


def neighbour_weights(sq_distances: np.ndarray, weighting: str | Weighting) -> np.ndarray:
    """Weights (Q, k) from squared L2 distances (Q, k), neighbours sorted nearest first."""
    weighting = parse_weighting(weighting)
    q, k = sq_distances.shape
    if weighting is Weighting.KNN:
        return np.ones((q, k))
    if weighting is Weighting.WKNN:
        return np.broadcast_to(1.0 / np.arange(1, k + 1), (q, k)).copy()
    d2 = np.maximum(sq_distances.astype(np.float64), 0.0)
    zero = d2 <= 0.0
    with np.errstate(divide="ignore"):
        w = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, d2))
    has_zero = zero.any(axis=1)
    w[has_zero] = zero[has_zero].astype(np.float64)
    return w


def class_scores(sq_distances: np.ndarray, neighbour_labels: np.ndarray, classes: np.ndarray,
                 weighting: str | Weighting) -> np.ndarray:
    """``s(q, classes[q])`` for every query q: the weighted share of neighbours of that class."""
    if sq_distances.shape != neighbour_labels.shape:
        raise InputError("distances and neighbour labels must have the same shape (Q, k)")
    w = neighbour_weights(sq_distances, weighting)
    valid = neighbour_labels >= 0  # faiss marks missing neighbours with -1
    w = np.where(valid, w, 0.0)
    hit = neighbour_labels == np.asarray(classes).reshape(-1, 1)
    total = w.sum(axis=1)
    return np.where(total > 0, (w * hit).sum(axis=1) / np.where(total > 0, total, 1.0), 0.0)
