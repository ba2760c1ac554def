"""The paper's kNN detector (paper 003, SPEC B): trust the model's prediction iff the neighbours
of the input's deep features agree with it. One :class:`~advguard.detection.bank.KNNBank` per
layer read (the default: the last convolutional block alone); with several layers the score is
the mean of the layers' (:meth:`KNNDetector.layer_scores` gives each).

Beside the score, the bank distance (Sun et al. 2022, :mod:`.familiar`): an input farther from
every training image than ``familiar_keep`` of the held-out split (noise, a blank, another
domain) is flagged whatever its neighbours say (:meth:`KNNDetector.unlike`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.attacks import Loss
from advguard.detection.adaptive import CentroidPull, SoftNeighbours, pick_surrogate
from advguard.detection.bank import KNNBank
from advguard.detection.base import Chunk, Detector, Features
from advguard.detection.features import LayerSpec, layer_key, resolve_layer
from advguard.detection.options import KNNOptions
from advguard.errors import CheckpointError


class KNNDetector(Detector):
    """The paper's detector (options: :class:`~advguard.detection.KNNOptions`)."""

    name = "knn"
    Options = KNNOptions
    surrogates = ("centroid", "soft")
    options: KNNOptions

    def resolve_layers(self, model: nn.Module) -> list[LayerSpec]:
        """The layers named, or the last convolutional block alone (the paper's)."""
        return super().resolve_layers(model) if self.layers else [resolve_layer(model, None)]

    def _bank(self, familiar: bool) -> KNNBank:
        o = self.options
        return KNNBank(o.k, o.weighting, o.preprocessing, o.index, seed=self.seed,
                       nlist=o.nlist, nprobe=o.nprobe, pq_m=o.pq_m, fit_sample=o.fit_sample,
                       familiar=familiar)

    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> KNNDetector:
        chunks = self._fitted_layers(chunks)
        first = next(chunks)
        if len(self.fitted_keys_) == 1:  # streamed: one bank, never held
            key = self.fitted_keys_[0]
            self.banks_ = {key: self._bank(True).fit_chunks(
                (f[key], y) for f, y in itertools.chain([first], chunks))}
        else:  # one pass over the data for every layer
            held = [first, *chunks]
            last = self.fitted_keys_[-1]
            self.banks_ = {key: self._bank(key == last).fit_chunks((f[key], y) for f, y in held)
                           for key in self.fitted_keys_}
        self.distance_limit_: float | None = None
        self.familiar_kept_: float | None = None
        return self

    def layer_scores(self, features: Features, predicted: np.ndarray) -> dict[str, np.ndarray]:
        """Each layer's ``s(q, predicted)`` (SPEC B3)."""
        self._check_fitted()
        return {key: bank.scores(features[key], predicted) for key, bank in self.banks_.items()}

    def score_features(self, features: Features, logits: np.ndarray) -> np.ndarray:
        scores = self.layer_scores(features, np.asarray(logits).argmax(1))
        return np.mean(list(scores.values()), axis=0)

    # --- the bank distance ----------------------------------------------------------------

    def bank_distance(self, features: Features) -> np.ndarray:
        """How far inputs lie from every training image, at the last layer read."""
        self._check_fitted()
        return self.banks_[self.fitted_keys_[-1]].distance(features[self.fitted_keys_[-1]])

    def fit_held_out(self, features: Features, logits: np.ndarray, labels: np.ndarray,
                     images: Any = None, workers: int | None = None) -> None:
        """The bank-distance limit: the ``familiar_keep`` quantile of the held-out split's."""
        distances = self.bank_distance(features)
        self.distance_limit_ = float(np.quantile(distances, self.options.familiar_keep))
        self.familiar_kept_ = float((distances <= self.distance_limit_).mean())

    def unlike(self, features: Features) -> np.ndarray | None:
        if getattr(self, "distance_limit_", None) is None:
            return None
        return self.bank_distance(features) > self.distance_limit_

    # --- persistence ----------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """Every layer's bank (:meth:`KNNBank.state`), prefixed by its layer key."""
        return {f"{key}/{name}": t for key, bank in self.banks_.items()
                for name, t in bank.state().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.banks_ = {key: self._bank(False).load_state(
            {n[len(key) + 1:]: t for n, t in tensors.items() if n.startswith(key + "/")}, key)
            for key in self.fitted_keys_}

    def fitted_meta(self) -> dict[str, Any]:
        return {"distance_limit": self.distance_limit_, "familiar_kept": self.familiar_kept_}

    def load_fitted_meta(self, meta: dict[str, Any]) -> None:
        self.distance_limit_ = meta.get("distance_limit")
        self.familiar_kept_ = meta.get("familiar_kept")

    @classmethod
    def upgrade(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Files of one-layer kNN detectors before the detectors were one family: their
        bank's tensors unprefixed, the layer as ``layer``, the settings flat."""
        if "layer_keys" in meta:
            return tensors, meta
        if not isinstance(meta.get("params"), dict) or not meta.get("layer"):
            raise CheckpointError(f"{where} is not an advguard detector")
        spec = LayerSpec(**meta["layer"])
        key = layer_key(spec)
        old = dict(meta["params"])
        params = {n: old[n] for n in ("keep", "batch_size", "device", "seed", "chunk_size")
                  if n in old}
        params.update({n: old[n] for n in ("k", "weighting", "preprocessing", "index", "nlist",
                                           "nprobe", "pq_m", "fit_sample") if n in old})
        params["layers"] = [key]
        return ({f"{key}/{n}": t for n, t in tensors.items()},
                {"detector": cls.name, "params": params, "offset": meta.get("offset"),
                 "layers": [spec.__dict__], "layer_keys": [key],
                 "fitted": {"distance_limit": meta.get("distance_limit")}})

    # --- the adaptive attack --------------------------------------------------------------

    def class_centroids(self) -> dict[str, np.ndarray]:
        """Every layer's class centroids in its pre-processed space."""
        self._check_fitted()
        return {key: bank.class_centroids() for key, bank in self.banks_.items()}

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        """``"centroid"`` (default): targeted cross-entropy plus, at every layer read, the
        squared distance of the pre-processed features to the target class's centroid
        (divided by the dimension; :class:`~advguard.detection.adaptive.CentroidPull`);
        ``"soft"``: the soft neighbour count
        (:class:`~advguard.detection.adaptive.SoftNeighbours`) in every layer's space."""
        surrogate = pick_surrogate(self.surrogates, surrogate)
        self._check_fitted(model=True)
        transforms = {k: b.preprocessor_.transform_tensor for k, b in self.banks_.items()}
        if surrogate == "soft":
            return SoftNeighbours(self.layers_, {k: (b.index_.vectors(), b.index_.labels)
                                                 for k, b in self.banks_.items()},
                                  transforms, self.options.k, weight, seed=self.seed)
        return CentroidPull(self.layers_, self.class_centroids(), transforms, weight,
                            per_dim=True)

