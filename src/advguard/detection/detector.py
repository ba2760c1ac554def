"""The kNN detector (paper 003, SPEC B): trust the model's prediction iff the neighbours of the
input's deep features agree with it. scikit-learn's outlier-detector conventions: ``fit`` returns
``self`` and sets trailing-underscore attributes; ``score_samples`` (higher = more trustworthy),
``decision_function = score_samples − offset_``, ``predict`` → +1 trusted / −1 flagged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.data.checks import check_images, check_labels
from advguard.detection.features import extract_features, resolve_layer
from advguard.detection.index import FeatureIndex
from advguard.detection.preprocessing import Preprocessor, parse_preprocessing
from advguard.detection.scores import class_scores, parse_weighting
from advguard.errors import CheckpointError, InputError
from advguard.evaluation import keep_threshold
from advguard.io import load_tensors, save_tensors


class KNNDetector:
    def __init__(self, k: int = 1000, weighting: str = "dwknn",
                 preprocessing: str = "pca-whiten", layer: str | None = None,
                 index: str = "flat", keep: float = 0.98, batch_size: int = 1000,
                 device: str = "cpu", seed: int = 0) -> None:
        self.k = k
        self.weighting = weighting
        self.preprocessing = preprocessing
        self.layer = layer
        self.index = index
        self.keep = keep
        self.batch_size = batch_size
        self.device = device
        self.seed = seed

    # --- feature level ------------------------------------------------------------------

    def fit_features(self, features: np.ndarray | torch.Tensor,
                     labels: np.ndarray | torch.Tensor) -> KNNDetector:
        """Fit the pre-processing on the labelled bank and index it."""
        if self.k < 1:
            raise InputError(f"k must be at least 1, got {self.k}")
        parse_weighting(self.weighting)
        f = np.asarray(features, dtype=np.float32)
        self.preprocessor_ = Preprocessor(parse_preprocessing(self.preprocessing)).fit(
            f, seed=self.seed)
        self.index_ = FeatureIndex(self.preprocessor_.transform(f), np.asarray(labels),
                                   kind=self.index, seed=self.seed)
        self.offset_: float | None = None
        return self

    def score_features(self, features: np.ndarray | torch.Tensor,
                       predicted: np.ndarray | torch.Tensor) -> np.ndarray:
        """``s(q, predicted)`` for feature rows ``features`` (SPEC B3)."""
        self._check_fitted()
        d2, labels = self.index_.search(
            self.preprocessor_.transform(np.asarray(features, dtype=np.float32)), self.k)
        return class_scores(d2, labels, np.asarray(predicted), self.weighting)

    # --- image level --------------------------------------------------------------------

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            x_calibration: torch.Tensor | None = None,
            y_calibration: torch.Tensor | None = None, progress: bool = False) -> KNNDetector:
        """Bank = deep features of ``(x, y)`` (the training set, true labels). With a
        calibration split, ``offset_`` keeps ``keep`` of its correctly classified inputs."""
        check_images(x)
        check_labels(y, len(x))
        self.model_ = model
        self.layer_ = resolve_layer(model, self.layer)
        features, _ = extract_features(model, x, self.layer_, batch_size=self.batch_size,
                                       device=self.device, progress=progress)
        self.fit_features(features, y)
        if x_calibration is not None and y_calibration is not None:
            self.set_threshold(x_calibration, y_calibration)
        return self

    def inspect(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted classes, scores of those classes)`` for images ``x``."""
        self._check_fitted(model=True)
        check_images(x)
        features, predicted = extract_features(self.model_, x, self.layer_,
                                               batch_size=self.batch_size, device=self.device)
        return predicted.numpy(), self.score_features(features, predicted)

    def score_samples(self, x: torch.Tensor) -> np.ndarray:
        """Trust score of each image's predicted class; higher = more trustworthy."""
        return self.inspect(x)[1]

    def set_threshold(self, x: torch.Tensor, y: torch.Tensor, keep: float | None = None) -> float:
        """Set ``offset_`` so that a share ``keep`` of the correctly classified ``x`` is kept."""
        keep = self.keep if keep is None else keep
        predicted, scores = self.inspect(x)
        authentic = scores[predicted == np.asarray(y)]
        if len(authentic) == 0:
            raise InputError("no correctly classified calibration input to set a threshold")
        self.offset_ = keep_threshold(authentic, keep)
        return self.offset_

    def decision_function(self, x: torch.Tensor) -> np.ndarray:
        if getattr(self, "offset_", None) is None:
            raise InputError("no threshold yet: fit with a calibration split or call "
                             "set_threshold(x, y)")
        return self.score_samples(x) - float(self.offset_)  # type: ignore[arg-type]

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """+1 where the model's prediction is trusted, −1 where it is flagged."""
        return np.where(self.decision_function(x) >= 0, 1, -1)

    # --- persistence ----------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "weighting": self.weighting, "preprocessing": self.preprocessing,
                "layer": self.layer, "index": self.index, "keep": self.keep,
                "batch_size": self.batch_size, "device": self.device, "seed": self.seed}

    def save(self, path: str | Path) -> Path:
        """Bank, labels and fitted pre-processing as safetensors (loads without running code)."""
        self._check_fitted()
        tensors = {"bank": torch.from_numpy(self.index_.features),
                   "labels": torch.from_numpy(self.index_.labels)}
        tensors.update({f"pre.{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.preprocessor_.state().items()})
        # the bank is stored already pre-processed
        return save_tensors(path, tensors, {"params": self.params(), "offset": self.offset_,
                                            "layer": getattr(self, "layer_", None).__dict__
                                            if hasattr(self, "layer_") else None})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> KNNDetector:
        tensors, meta = load_tensors(path)
        if "params" not in meta or "bank" not in tensors:
            raise CheckpointError(f"{path} is not an advguard detector")
        det = cls(**meta["params"])
        det.preprocessor_ = Preprocessor(det.preprocessing).load_state(
            {k[4:]: v.numpy() for k, v in tensors.items() if k.startswith("pre.")})
        det.index_ = FeatureIndex(tensors["bank"].numpy(), tensors["labels"].numpy(),
                                  kind=det.index, seed=det.seed)
        det.offset_ = meta["offset"]
        if model is not None:
            from advguard.detection.features import LayerSpec

            det.model_ = model
            det.layer_ = LayerSpec(**meta["layer"]) if meta.get("layer") else resolve_layer(
                model, det.layer)
        return det

    def _check_fitted(self, model: bool = False) -> None:
        if not hasattr(self, "index_"):
            raise InputError("the detector is not fitted: call fit(model, x, y) first")
        if model and not hasattr(self, "model_"):
            raise InputError("the detector has no model: fit(model, x, y) or load(path, model)")
