"""kNN deep-feature detection of adversarial inputs (paper 003, SPEC Part B)."""

from advguard.detection.adaptive import FeaturePull
from advguard.detection.detector import KNNDetector
from advguard.detection.features import (
    FeatureCapture,
    LayerSpec,
    default_layer,
    extract_features,
    extract_outputs,
    resolve_layer,
)
from advguard.detection.index import INDEX_KINDS, FeatureIndex
from advguard.detection.options import KNNOptions
from advguard.detection.preprocessing import Preprocessing, Preprocessor
from advguard.detection.scores import Weighting, class_scores, neighbour_weights
from advguard.detection.verdicts import Neighbours, Verdicts

__all__ = ["INDEX_KINDS", "FeatureCapture", "FeatureIndex", "FeaturePull", "KNNDetector",
           "KNNOptions",
           "LayerSpec", "Neighbours", "Preprocessing", "Preprocessor", "Verdicts", "Weighting",
           "class_scores", "default_layer", "extract_features", "extract_outputs",
           "neighbour_weights",
           "resolve_layer"]
