"""kNN deep-feature detection of adversarial inputs (paper 003, SPEC Part B)."""

from advguard.detection.adaptive import CentroidPull, SoftNeighbours
from advguard.detection.bank import KNNBank
from advguard.detection.base import Detector
from advguard.detection.deep_knn import DeepKNN
from advguard.detection.detector import KNNDetector
from advguard.detection.features import (
    FeatureCapture,
    LayersCapture,
    LayerSpec,
    default_layer,
    default_layers,
    extract_features,
    extract_layers,
    extract_outputs,
    layer_key,
    resolve_layer,
)
from advguard.detection.index import INDEX_KINDS, FeatureIndex
from advguard.detection.layered import LayeredKNN
from advguard.detection.mahalanobis import Mahalanobis
from advguard.detection.options import KNNOptions
from advguard.detection.preprocessing import Preprocessing, Preprocessor
from advguard.detection.registry import (
    DEFAULT_DETECTOR,
    DETECTORS,
    DetectorSettings,
    build_detector,
    detector_class,
    load_detector,
)
from advguard.detection.scores import Weighting, class_scores, neighbour_weights
from advguard.detection.verdicts import Neighbours, Verdicts

__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "INDEX_KINDS", "CentroidPull", "DeepKNN", "Detector",
           "DetectorSettings", "FeatureCapture", "FeatureIndex", "KNNBank", "KNNDetector",
           "KNNOptions", "LayerSpec", "SoftNeighbours", "detector_class",
           "LayeredKNN", "LayersCapture", "Mahalanobis", "Neighbours", "Preprocessing",
           "Preprocessor", "Verdicts", "Weighting", "build_detector", "class_scores",
           "default_layer", "default_layers", "extract_features", "extract_layers",
           "extract_outputs", "layer_key", "load_detector", "neighbour_weights", "resolve_layer"]
