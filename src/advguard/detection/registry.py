"""Every detector by name, in one place: the experiments, ``guard fit`` and ``serve`` build and
load detectors through :func:`build_detector` and :func:`load_detector`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from advguard.detection.base import Detector
from advguard.detection.deep_knn import DeepKNN
from advguard.detection.detector import KNNDetector
from advguard.detection.layered import LayeredKNN
from advguard.detection.mahalanobis import Mahalanobis
from advguard.errors import CheckpointError, InputError
from advguard.io import read_metadata

AnyDetector = Detector | KNNDetector
DETECTORS: dict[str, type[Detector] | type[KNNDetector]] = {
    KNNDetector.name: KNNDetector,  # the paper's, one layer
    LayeredKNN.name: LayeredKNN,  # the paper's score at several layers
    DeepKNN.name: DeepKNN,  # Papernot & McDaniel 2018
    Mahalanobis.name: Mahalanobis,  # Lee et al. 2018
}


def build_detector(name: str, **settings: Any) -> AnyDetector:
    """A detector by its registered name, with its own settings."""
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)}")
    try:
        return DETECTORS[name](**settings)
    except TypeError as exc:
        raise InputError(f"detector {name!r}: {exc}") from None


def load_detector(path: str | Path, model: nn.Module | None = None) -> AnyDetector:
    """Whatever detector ``path`` holds (files written before the registry hold a kNN one)."""
    name = read_metadata(path).get("detector", KNNDetector.name)
    if name not in DETECTORS:
        raise CheckpointError(f"{path} holds an unknown detector {name!r}")
    return DETECTORS[name].load(path, model)
