"""The one detector interface (scikit-learn's outlier-detector contract, in the manner of
pytorch-ood's detectors): ``fit`` returns ``self`` and sets trailing-underscore attributes;
``score_samples`` (higher = the model's prediction is more trustworthy); ``decision_function =
score_samples − offset_``; ``predict`` → +1 trusted / −1 flagged; ``calibrate`` sets ``offset_``
from a keep rate on held-out, correctly classified inputs; ``save``/``load`` through
safetensors. The paper's kNN detector is one of them.

A detector declares its own options as one dataclass (:attr:`Detector.Options`: the registry,
``guard fit``, the guard folder and ``reproduce detect`` read them from it), reads deep features
at named layers (forward hooks, :mod:`.features`; none for a detector of the logits alone) and
writes four things: :meth:`Detector.fit_feature_chunks` (the bank, streamed),
:meth:`Detector.score_features` (from the features *and* the logits),
:meth:`Detector.state` / :meth:`Detector.load_state` and :meth:`Detector.adaptive_loss` (the
loss of the attack made for it, Tramèr et al. 2020). :meth:`Detector.fit_held_out` is where a
detector that needs a split held out of the bank (conformal calibration, a layer combination, a
distance limit) fits it; :meth:`Detector.unlike` flags inputs whatever their score.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from advguard import options
from advguard.attacks import Loss
from advguard.batching import batch_slices
from advguard.data.checks import check_images, check_labels
from advguard.detection.features import (
    LayerSpec,
    dataset_layers,
    extract_layers,
    layer_key,
    resolve_layers,
)
from advguard.detection.verdicts import Verdicts
from advguard.errors import CheckpointError, InputError
from advguard.evaluation import keep_threshold
from advguard.evaluation.detection import KEEP
from advguard.io import load_tensors, save_tensors

Features = dict[str, np.ndarray]  # layer key -> (N, D_layer)
Chunk = tuple[Features, np.ndarray]  # features and labels of a chunk of the bank


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a detector that has none of its own."""


class Detector(ABC):
    """Every detector: options, layers, streaming, thresholds, decisions, persistence."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions  # a frozen dataclass of the detector's own options
    # the adaptive attack's surrogates for the detector's decision, the default first
    surrogates: ClassVar[tuple[str, ...]] = ("centroid",)
    # whether :meth:`fit_seen_attack` learns from adversarial images of a validation split
    learns_attacks: ClassVar[bool] = False

    def __init__(self, layers: tuple[str, ...] | None = None, keep: float = KEEP, *,
                 most_layers: int = 4, batch_size: int = 1000, device: str = "cpu",
                 seed: int = 0, chunk_size: int = 10_000, **settings: Any) -> None:
        """``settings``: the fields of :attr:`Options` (an option the detector does not have
        is refused)."""
        options.check_fraction("keep", keep)
        options.device(device)
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size),
                            ("most_layers", most_layers)):
            options.check_int(name, value)
        self.layers = tuple(layers) if layers else None
        self.keep, self.most_layers = keep, most_layers
        self.batch_size, self.device, self.seed, self.chunk_size = (batch_size, device, seed,
                                                                    chunk_size)
        self.offset_: float | None = None
        self.options = make_options(self, settings)

    # --- what a detector writes ---------------------------------------------------------

    @abstractmethod
    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> Detector:
        """Fit on the bank: chunks of ``({layer: features}, labels)``, never one array."""

    @abstractmethod
    def score_features(self, features: Features, logits: np.ndarray) -> np.ndarray:
        """Trust in the model's classes (``logits.argmax(1)``) from the inputs' features and
        logits (N, classes)."""

    def fit_held_out(self, features: Features, logits: np.ndarray,  # noqa: B027
                     labels: np.ndarray, images: Any = None, workers: int | None = None) -> None:
        """Fit what needs a split held out of the bank (nothing by default), from the split's
        features, logits and labels; ``images`` (a tensor, or a Dataset / DataLoader) for a
        detector that needs more than the features, such as altered copies."""

    def fit_seen_attack(self, clean: Features, adversarial: Features, on: str) -> None:
        """Learn from ``adversarial`` images of a validation split against ``clean`` ones
        (``on`` says which): only a detector with :attr:`learns_attacks`; never the test
        attacks."""
        raise InputError(f"the {self.name} detector learns nothing from attacks")

    def unlike(self, features: Features) -> np.ndarray | None:
        """Inputs flagged whatever their score (N,) bool, or None: nothing flagged so."""
        return None

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The fitted state as tensors (safetensors: loading runs no code)."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        """Targeted PGD's objective for an attacker who knows this detector (one of
        :attr:`surrogates`, the first by default)."""

    def fitted_meta(self) -> dict[str, Any]:
        """Fitted facts that are not tensors (saved in the file's metadata)."""
        return {}

    def load_fitted_meta(self, meta: dict[str, Any]) -> None: ...  # noqa: B027

    def params(self) -> dict[str, Any]:
        """Everything the constructor took (saved; ``load`` builds the detector from it)."""
        return {"layers": list(self.layers) if self.layers else None, "keep": self.keep,
                "most_layers": self.most_layers, "batch_size": self.batch_size,
                "device": self.device, "seed": self.seed, "chunk_size": self.chunk_size,
                **options.as_json(self.options)}

    @classmethod
    def upgrade(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A file written by an earlier version, in today's form (as it is by default)."""
        return tensors, meta

    # --- features -----------------------------------------------------------------------

    def fit_features(self, features: Features, labels: np.ndarray | torch.Tensor) -> Detector:
        return self.fit_feature_chunks([(features, np.asarray(labels))])

    @property
    def layer_keys(self) -> list[str]:
        return [layer_key(s) for s in self.layers_]

    def features(self, x: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """``({layer: features}, logits)`` of images ``x``."""
        self._check_fitted(model=True)
        check_images(x)
        return extract_layers(self.model_, x, self.layers_, batch_size=self.batch_size,
                              device=self.device)

    def resolve_layers(self, model: nn.Module) -> list[LayerSpec]:
        """The layers read from ``model``: those named, or up to ``most_layers`` defaults."""
        return resolve_layers(model, self.layers, self.most_layers)

    def fit(self, model: nn.Module, x: Any, y: torch.Tensor | None = None, *,
            x_calibration: torch.Tensor | None = None,
            y_calibration: torch.Tensor | None = None, progress: bool = False,
            workers: int | None = None) -> Detector:
        """Bank = features of ``(x, y)`` (the training set, true labels), or of a Dataset or
        DataLoader of ``(image, label)`` given as ``x`` alone, streamed chunk by chunk. A
        calibration split (held out of the bank) fits :meth:`fit_held_out` and ``offset_``."""
        self.model_ = model
        self.layers_: list[LayerSpec] = self.resolve_layers(model)
        chunks: Iterator[Chunk]
        if y is None:
            chunks = ((f, labels) for f, labels, _ in self._stream(x, workers, progress))
        else:
            check_images(x)
            check_labels(y, len(x))
            chunks = ((extract_layers(model, x[sl], self.layers_, batch_size=self.batch_size,
                                      device=self.device)[0], np.asarray(y[sl]))
                      for sl in batch_slices(len(x), self.chunk_size, progress=progress,
                                             desc="bank"))
        self.fit_feature_chunks(chunks)
        if x_calibration is not None and y_calibration is not None:
            features, logits = self.features(x_calibration)
            self._fit_held_out_split(features, logits.numpy(), np.asarray(y_calibration),
                                     x_calibration, None)
        return self

    def fit_held_out_data(self, data: Any, *, workers: int | None = None,
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`fit_held_out` and the threshold from a Dataset or DataLoader of ``(image,
        label)`` (streamed; the features are held, not the images); returns the split's
        ``(predicted, scores, labels)`` as :meth:`inspect_dataset` does."""
        self._check_fitted(model=True)
        parts = list(self._stream(data, workers, progress))
        features = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        labels = np.concatenate([p[1] for p in parts])
        logits = np.concatenate([p[2] for p in parts])
        scores = self._fit_held_out_split(features, logits, labels, data, workers)
        return logits.argmax(1), scores, labels

    def _fit_held_out_split(self, features: Features, logits: np.ndarray,
                            labels: np.ndarray, images: Any, workers: int | None) -> np.ndarray:
        """:meth:`fit_held_out`, then the threshold from the same features (one pass)."""
        self.fit_held_out(features, logits, labels, images, workers)
        scores = self.score_features(features, logits)
        self.calibrate(logits.argmax(1), scores, labels)
        return scores

    def _stream(self, data: Any, workers: int | None, progress: bool = False
                ) -> Iterator[tuple[Features, np.ndarray, np.ndarray]]:
        """``({layer: features}, labels, logits)`` chunks of a Dataset or DataLoader."""
        return dataset_layers(self.model_, data, self.layers_, chunk_size=self.chunk_size,
                              batch_size=self.batch_size, device=self.device, workers=workers,
                              progress=progress)

    # --- scores and decisions -------------------------------------------------------------

    def inspect(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted classes, scores of those classes)`` for images ``x``."""
        features, logits = self.features(x)
        return logits.argmax(1).numpy(), self.score_features(features, logits.numpy())

    def inspect_dataset(self, data: Any, *, workers: int | None = None,
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(predicted classes, scores, labels)`` of a Dataset or DataLoader, streamed."""
        self._check_fitted(model=True)
        out = [(z.argmax(1), self.score_features(f, z), y)
               for f, y, z in self._stream(data, workers, progress)]
        return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore

    def score_samples(self, x: torch.Tensor) -> np.ndarray:
        """Trust score of each image's predicted class; higher = more trustworthy."""
        return self.inspect(x)[1]

    def set_threshold(self, x: torch.Tensor, y: torch.Tensor, keep: float | None = None) -> float:
        """Set ``offset_`` so that a share ``keep`` of the correctly classified ``x`` is kept."""
        predicted, scores = self.inspect(x)
        return self.calibrate(predicted, scores, y, keep)

    def calibrate(self, predicted: np.ndarray, scores: np.ndarray,
                  y: np.ndarray | torch.Tensor, keep: float | None = None) -> float:
        """:meth:`set_threshold` from predictions and scores already computed (``inspect``)."""
        keep = self.keep if keep is None else keep
        authentic = np.asarray(scores)[np.asarray(predicted) == np.asarray(y)]
        if len(authentic) == 0:
            raise InputError("no correctly classified calibration input to set a threshold")
        self.offset_ = keep_threshold(authentic, keep)
        return self.offset_

    def decision_function(self, x: torch.Tensor) -> np.ndarray:
        return self.score_samples(x) - self._threshold()

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """+1 where the model's prediction is trusted, −1 where it is flagged."""
        return np.where(self.decision_function(x) >= 0, 1, -1)

    def verdicts(self, x: torch.Tensor) -> Verdicts:
        """Class, probabilities, score, trusted/flagged of images ``x`` (paper 003 §5.1):
        trusted where the score reaches ``offset_`` and :meth:`unlike` does not flag."""
        threshold = self._threshold()
        features, logits = self.features(x)
        scores = self.score_features(features, logits.numpy())
        unlike = self.unlike(features)
        trusted = scores >= threshold if unlike is None else (scores >= threshold) & ~unlike
        return Verdicts(logits.argmax(1).numpy(), logits.softmax(1).numpy(), scores, trusted,
                        threshold, unlike)

    def _threshold(self) -> float:
        self._check_fitted(model=True)
        if getattr(self, "offset_", None) is None:
            raise InputError("no threshold yet: fit with a calibration split or call "
                             "set_threshold(x, y)")
        return float(self.offset_)  # type: ignore[arg-type]

    # --- persistence ----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        self._check_fitted()
        layers = [s.__dict__ for s in getattr(self, "layers_", [])]
        # copies: several layers' banks may share one labels array, which safetensors refuses
        tensors = {k: t.clone() for k, t in self.state().items()}
        return save_tensors(path, tensors, {"detector": self.name, "params": self.params(),
                                                 "offset": self.offset_, "layers": layers,
                                                 "layer_keys": self.fitted_keys_,
                                                 "fitted": self.fitted_meta()})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Detector:
        tensors, meta = cls.upgrade(*load_tensors(path), str(path))
        if meta.get("detector") != cls.name or not isinstance(meta.get("params"), dict):
            raise CheckpointError(f"{path} is not a {cls.name} detector")
        try:
            det = cls(**meta["params"])
        except (TypeError, InputError) as exc:
            raise CheckpointError(f"{path}: unreadable detector settings ({exc})") from None
        det.fitted_keys_ = list(meta["layer_keys"])
        det.load_state(tensors)
        det.load_fitted_meta(meta.get("fitted") or {})
        det.offset_ = meta.get("offset")
        if model is not None:
            det.model_ = model
            det.layers_ = [LayerSpec(**s) for s in meta["layers"]]
        return det

    def _fitted_layers(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        """``chunks``, checked, recording the layer keys of the first (the fitted layers)."""
        first = True
        for features, labels in chunks:
            if first:
                self.fitted_keys_ = list(features)
                first = False
            elif list(features) != self.fitted_keys_:
                raise InputError("every chunk of the bank must hold the same layers")
            yield {k: np.asarray(v, np.float32) for k, v in features.items()}, np.asarray(labels)
        if first:
            raise InputError("the bank is empty: give at least one labelled feature vector")

    def _check_fitted(self, model: bool = False) -> None:
        if not hasattr(self, "fitted_keys_"):
            raise InputError(f"the {self.name} detector is not fitted: call fit(model, x, y)")
        if model and not hasattr(self, "model_"):
            raise InputError("the detector has no model: fit(model, x, y) or load(path, model)")


def make_options(detector: Detector, settings: dict[str, Any]) -> Any:
    """``detector``'s :attr:`~Detector.Options` from ``settings``; one it does not have is
    refused, naming those it has."""
    names = [f.name for f in dataclasses.fields(detector.Options)]
    extra = sorted(set(settings) - set(names))
    if extra:
        raise InputError(f"the {detector.name} detector has no option {', '.join(extra)}; its "
                         f"options: {', '.join(names) or 'none'}")
    return detector.Options(**settings)
