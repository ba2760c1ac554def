"""kNN deep-feature detection of adversarial inputs (paper 003, SPEC Part B)."""

from advguard.detection.detector import KNNDetector
from advguard.detection.features import LayerSpec, default_layer, extract_features
from advguard.detection.index import FeatureIndex
from advguard.detection.preprocessing import Preprocessing, Preprocessor
from advguard.detection.scores import Weighting, class_scores, neighbour_weights

__all__ = ["FeatureIndex", "KNNDetector", "LayerSpec", "Preprocessing", "Preprocessor",
           "Weighting", "class_scores", "default_layer", "extract_features",
           "neighbour_weights"]
