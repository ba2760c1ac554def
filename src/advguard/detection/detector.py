"""The kNN detector (paper 003, SPEC B): trust the model's prediction iff the neighbours of the
input's deep features agree with it. scikit-learn's outlier-detector conventions: ``fit`` returns
``self`` and sets trailing-underscore attributes; ``score_samples`` (higher = more trustworthy),
``decision_function = score_samples − offset_``, ``predict`` → +1 trusted / −1 flagged.

:meth:`KNNDetector.kneighbors` exposes the neighbour search itself (as scikit-learn's
``kneighbors`` does), so one search can be scored under every weighting.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard import options
from advguard.batching import batch_slices
from advguard.data.checks import check_images, check_labels
from advguard.detection.adaptive import FeaturePull, SoftNeighbours, pick_surrogate
from advguard.detection.base import Thresholded
from advguard.detection.familiar import Familiarity
from advguard.detection.features import (
    LayerSpec,
    dataset_features,
    extract_features,
    extract_outputs,
    layer_key,
    resolve_layer,
)
from advguard.detection.index import INDEX_KINDS, FeatureIndex
from advguard.detection.options import KNNOptions
from advguard.detection.preprocessing import Preprocessing, Preprocessor, parse_preprocessing
from advguard.detection.scores import Weighting, parse_weighting
from advguard.detection.verdicts import Neighbours, Verdicts
from advguard.errors import CheckpointError, InputError
from advguard.io import load_tensors, save_tensors


class KNNDetector(Thresholded):
    """The paper's detector at one layer (the default: the last convolutional block)."""

    name = "knn"
    surrogates = ("centroid", "soft")

    def __init__(self, k: int = KNNOptions.k, weighting: str | Weighting = KNNOptions.weighting,
                 preprocessing: str | Preprocessing = KNNOptions.preprocessing,
                 layer: str | None = None, index: str = KNNOptions.index,
                 keep: float = KNNOptions.keep,
                 batch_size: int = 1000, device: str = "cpu", seed: int = 0, *,
                 nlist: int = 1024, nprobe: int = 16, pq_m: int | None = None,
                 chunk_size: int = 10_000, fit_sample: int = 100_000) -> None:
        """``index``: ``flat`` (exact), ``ivf`` or ``ivfpq`` (approximate; ``nlist`` cells,
        ``nprobe`` searched, ``pq_m`` bytes a vector — see :mod:`advguard.detection.index`).
        ``fit`` extracts features ``chunk_size`` images at a time and fits the
        pre-processing and the IVF cells on the first ``fit_sample`` vectors."""
        options.check_int("k", k, types=(int, np.integer))
        options.check_fraction("keep", keep)
        options.device(device)
        options.check_int("batch_size", batch_size)
        if index not in INDEX_KINDS:
            raise InputError(f"unknown index {index!r}; choose one of: {', '.join(INDEX_KINDS)}")
        self.k = int(k)
        self.weighting = parse_weighting(weighting)
        self.preprocessing = parse_preprocessing(preprocessing)
        self.layer = layer
        self.index = index
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("chunk_size", chunk_size),
                            ("fit_sample", fit_sample), ("pq_m", 1 if pq_m is None else pq_m)):
            options.check_int(name, value)
        self.nlist, self.nprobe, self.pq_m = nlist, nprobe, pq_m
        self.chunk_size, self.fit_sample = chunk_size, fit_sample
        self.keep = keep
        self.batch_size = batch_size
        self.device = device
        self.seed = seed

    # --- feature level ------------------------------------------------------------------

    def fit_features(self, features: np.ndarray | torch.Tensor,
                     labels: np.ndarray | torch.Tensor) -> KNNDetector:
        """Fit the pre-processing on the labelled bank and index it."""
        return self.fit_feature_chunks([(features, labels)])

    def fit_feature_chunks(self, chunks: Iterable[tuple[Any, Any]]) -> KNNDetector:
        """The bank from chunks of ``(features, labels)``, never one array: the pre-processing
        and IVF cells are fitted on the first ``fit_sample`` vectors."""
        it = iter(chunks)
        head: list[tuple[np.ndarray, np.ndarray]] = []
        seen = 0
        for f, y in it:
            head.append((np.asarray(f, dtype=np.float32), np.asarray(y)))
            seen += len(head[-1][0])
            if seen >= self.fit_sample:
                break
        if not head or seen == 0:
            raise InputError("the bank is empty: give at least one labelled feature vector")
        sample = np.concatenate([f for f, _ in head])[:self.fit_sample]
        self.preprocessor_ = Preprocessor(self.preprocessing).fit(sample, seed=self.seed)
        z = self.preprocessor_.transform(sample)
        self.index_ = FeatureIndex(z.shape[1], self.index, nlist=self.nlist,
                                   nprobe=self.nprobe, pq_m=self.pq_m, seed=self.seed).train(z)
        self.familiar_: Familiarity | None = Familiarity(sample.shape[1])  # Sun et al. 2022
        for f, y in itertools.chain(head, it):
            self.index_.add(self.preprocessor_.transform(np.asarray(f, np.float32)), np.asarray(y))
            self.familiar_.add(f)
        self.offset_: float | None = None
        return self

    def kneighbors_features(self, features: np.ndarray | torch.Tensor) -> Neighbours:
        """The k nearest bank entries of pre-processed ``features`` (one search)."""
        self._check_fitted()
        d2, labels = self.index_.search(
            self.preprocessor_.transform(np.asarray(features, dtype=np.float32)), self.k)
        return Neighbours(d2, labels)

    def score_features(self, features: np.ndarray | torch.Tensor,
                       predicted: np.ndarray | torch.Tensor) -> np.ndarray:
        """``s(q, predicted)`` for feature rows ``features`` (SPEC B3)."""
        return self.kneighbors_features(features).scores(predicted, self.weighting)

    def class_centroids(self) -> np.ndarray:
        """Mean pre-processed bank vector of every class (classes × d)."""
        self._check_fitted()
        bank, labels = self.index_.vectors(), self.index_.labels
        return np.stack([bank[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    # --- image level --------------------------------------------------------------------

    def fit(self, model: nn.Module, x: Any, y: torch.Tensor | None = None, *,
            x_calibration: torch.Tensor | None = None,
            y_calibration: torch.Tensor | None = None, progress: bool = False,
            workers: int | None = None) -> KNNDetector:
        """Bank = deep features of ``(x, y)`` (the training set, true labels), or of a Dataset
        or DataLoader of ``(image, label)`` given as ``x`` alone, read batch by batch
        (``workers`` DataLoader workers): the bank is filled chunk by chunk, never held as
        images. With a calibration split, ``offset_`` keeps ``keep`` of its correctly
        classified inputs."""
        self.model_ = model
        self.layer_ = resolve_layer(model, self.layer)
        chunks: Iterable[tuple[Any, Any]]
        if y is None:
            chunks = dataset_features(model, x, self.layer_, chunk_size=self.chunk_size,
                                      batch_size=self.batch_size, device=self.device,
                                      workers=workers, progress=progress)
        else:
            check_images(x)
            check_labels(y, len(x))
            chunks = ((extract_features(model, x[sl], self.layer_, batch_size=self.batch_size,
                                        device=self.device)[0], y[sl])
                      for sl in batch_slices(len(x), self.chunk_size, progress=progress,
                                             desc="bank"))
        self.fit_feature_chunks(chunks)
        if x_calibration is not None and y_calibration is not None:
            self.set_threshold(x_calibration, y_calibration)
        return self

    def kneighbors(self, x: torch.Tensor) -> tuple[np.ndarray, Neighbours]:
        """``(predicted classes, neighbours of the deep features)`` of images ``x``."""
        self._check_fitted(model=True)
        check_images(x)
        features, predicted = extract_features(self.model_, x, self.layer_,
                                               batch_size=self.batch_size, device=self.device)
        return predicted.numpy(), self.kneighbors_features(features)

    def inspect(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted classes, scores of those classes)`` for images ``x``."""
        predicted, neighbours = self.kneighbors(x)
        return predicted, neighbours.scores(predicted, self.weighting)

    def inspect_dataset(self, data: Any, *, workers: int | None = None, progress: bool = False,
                        distances: bool = False) -> tuple[np.ndarray, ...]:
        """``(predicted classes, scores, labels)`` of a Dataset or DataLoader, streamed; with
        ``distances``, each input's :meth:`bank_distance` as a fourth array."""
        self._check_fitted(model=True)
        out = []
        for f, y, p in dataset_features(self.model_, data, self.layer_,
                                        chunk_size=self.chunk_size, batch_size=self.batch_size,
                                        device=self.device, workers=workers, progress=progress,
                                        predictions=True):
            row = (np.asarray(p), self.score_features(f, np.asarray(p)), np.asarray(y))
            out.append((*row, self.bank_distance(f)) if distances else row)
        return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))

    def bank_distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """How far inputs lie from every training image (:mod:`.familiar`)."""
        if getattr(self, "familiar_", None) is None:
            raise InputError("this detector was saved without its bank distances: fit it again")
        return self.familiar_.distance(np.asarray(features))  # type: ignore[union-attr]

    def set_distance_limit(self, distances: np.ndarray, keep: float) -> float:
        """Flag what lies farther than a share ``keep`` of held-out ``distances``."""
        options.check_fraction("keep", keep)
        self.distance_limit_: float | None = float(np.quantile(np.asarray(distances), keep))
        return self.distance_limit_

    def verdicts(self, x: torch.Tensor) -> Verdicts:
        """Class, probabilities, score, trusted/flagged of images ``x`` (paper §5.1)."""
        threshold = self._threshold()
        check_images(x)
        features, logits = extract_outputs(self.model_, x, self.layer_,
                                           batch_size=self.batch_size, device=self.device)
        predicted = logits.argmax(1).numpy()
        neighbours = self.kneighbors_features(features)
        scores = neighbours.scores(predicted, self.weighting)
        limit = getattr(self, "distance_limit_", None)
        unlike = None if limit is None else self.bank_distance(features) > limit
        trusted = scores >= threshold if unlike is None else (scores >= threshold) & ~unlike
        return Verdicts(predicted, logits.softmax(1).numpy(), scores, trusted, threshold, unlike)

    # --- persistence ----------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "weighting": self.weighting.value,
                "preprocessing": self.preprocessing.value, "layer": self.layer,
                "index": self.index, "keep": self.keep, "batch_size": self.batch_size,
                "device": self.device, "seed": self.seed, "nlist": self.nlist,
                "nprobe": self.nprobe, "pq_m": self.pq_m, "chunk_size": self.chunk_size,
                "fit_sample": self.fit_sample}

    def state(self) -> dict[str, torch.Tensor]:
        """The FAISS index (its own serialisation, the bank stored once), the labels, the
        bank distances and the fitted pre-processing, as tensors."""
        self._check_fitted()
        tensors = {"index": torch.from_numpy(self.index_.to_bytes()),
                   "labels": torch.from_numpy(self.index_.labels)}
        if (familiar := getattr(self, "familiar_", None)) is not None:
            tensors["familiar"] = torch.from_numpy(familiar.to_bytes())
        tensors.update({f"pre.{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.preprocessor_.state().items()})
        return tensors

    def save(self, path: str | Path) -> Path:
        """:meth:`state` as safetensors (loads without running code)."""
        layer = getattr(self, "layer_", None)
        limit = getattr(self, "distance_limit_", None)
        return save_tensors(path, self.state(), {"detector": self.name, "params": self.params(),
                                                 "offset": self.offset_,
                                                 "distance_limit": limit,
                                                 "layer": None if layer is None
                                                 else layer.__dict__})

    @property
    def layer_keys(self) -> list[str]:
        """The layer it reads, named as the multi-layer detectors name theirs."""
        return [layer_key(self.layer_)]

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Any:
        """Targeted PGD's objective for an attacker who knows this detector: ``"centroid"``
        (:class:`FeaturePull`, default) or ``"soft"`` (:class:`SoftNeighbours`)."""
        if pick_surrogate(self.surrogates, surrogate) == "centroid":
            layer: str | LayerSpec | None = (self.layer_ if hasattr(self, "layer_")
                                             else self.layer)
            return FeaturePull(layer, self.class_centroids(), self.preprocessor_.transform_tensor,
                               weight)
        key = self.layer_keys[0]
        return SoftNeighbours([self.layer_], {key: (self.index_.vectors(), self.index_.labels)},
                              {key: self.preprocessor_.transform_tensor}, self.k, weight,
                              seed=self.seed)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> KNNDetector:
        tensors, meta = load_tensors(path)
        if not isinstance(meta.get("params"), dict) or "labels" not in tensors:
            raise CheckpointError(f"{path} is not an advguard detector")
        try:
            det = cls(**meta["params"])
        except TypeError as exc:
            raise CheckpointError(f"{path}: unreadable detector settings ({exc})") from None
        det.load_state(tensors, str(path))
        det.offset_ = meta.get("offset")
        det.distance_limit_ = meta.get("distance_limit")
        if model is not None:
            det.model_ = model
            det.layer_ = LayerSpec(**meta["layer"]) if meta.get("layer") else resolve_layer(
                model, det.layer)
        return det

    def load_state(self, tensors: dict[str, torch.Tensor], where: str = "the file") -> None:
        self.preprocessor_ = Preprocessor(self.preprocessing).load_state(
            {k[4:]: v.numpy() for k, v in tensors.items() if k.startswith("pre.")})
        labels = tensors["labels"].numpy()
        if "index" in tensors:
            self.index_ = FeatureIndex.from_bytes(tensors["index"].numpy(), labels, self.index)
        elif "bank" in tensors:  # files of advguard 0.1 stored the vectors themselves
            self.index_ = FeatureIndex.build(tensors["bank"].numpy(), labels, kind=self.index,
                                             seed=self.seed)
        else:
            raise CheckpointError(f"{where} holds no feature bank")
        self.familiar_ = (Familiarity.from_bytes(tensors["familiar"].numpy(), len(labels))
                          if "familiar" in tensors else None)

    def _check_fitted(self, model: bool = False) -> None:
        if not hasattr(self, "index_"):
            raise InputError("the detector is not fitted: call fit(model, x, y) first")
        if model and not hasattr(self, "model_"):
            raise InputError("the detector has no model: fit(model, x, y) or load(path, model)")
