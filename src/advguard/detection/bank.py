"""The paper's kNN score in one feature space (SPEC B2–B3), below any model: a labelled bank of
feature vectors, pre-processed (none, L2 or PCA-whitening, fitted on the bank), indexed by FAISS,
and ``s(q, c)`` from the k nearest entries. :class:`~advguard.detection.KNNDetector` keeps one
bank per layer it reads; the paper's tables score one bank under every pre-processing and
weighting.

:meth:`KNNBank.kneighbors` exposes the neighbour search itself (as scikit-learn's
``kneighbors`` does), so one search can be scored under every weighting.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from advguard import options
from advguard.detection.familiar import Familiarity
from advguard.detection.index import INDEX_KINDS, FeatureIndex
from advguard.detection.options import KNNOptions
from advguard.detection.preprocessing import Preprocessing, Preprocessor, parse_preprocessing
from advguard.detection.scores import Weighting, parse_weighting
from advguard.detection.verdicts import Neighbours
from advguard.errors import CheckpointError, InputError


class KNNBank:
    """``fit(features, labels)`` (or :meth:`fit_chunks`), then ``scores(features, classes)``.

    ``index``: ``flat`` (exact), ``ivf`` or ``ivfpq`` (approximate; ``nlist`` cells, ``nprobe``
    searched, ``pq_m`` bytes a vector — see :mod:`advguard.detection.index`). The
    pre-processing and the IVF cells are fitted on the first ``fit_sample`` vectors. With
    ``familiar``, the bank's normalised features are also kept for :meth:`distance`."""

    def __init__(self, k: int = KNNOptions.k, weighting: str | Weighting = KNNOptions.weighting,
                 preprocessing: str | Preprocessing = KNNOptions.preprocessing,
                 index: str = KNNOptions.index, *, seed: int = 0, nlist: int = 1024,
                 nprobe: int = 16, pq_m: int | None = None, fit_sample: int = 100_000,
                 familiar: bool = False) -> None:
        options.check_int("k", k, types=(int, np.integer))
        if index not in INDEX_KINDS:
            raise InputError(f"unknown index {index!r}; choose one of: {', '.join(INDEX_KINDS)}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("fit_sample", fit_sample),
                            ("pq_m", 1 if pq_m is None else pq_m)):
            options.check_int(name, value)
        self.k = int(k)
        self.weighting = parse_weighting(weighting)
        self.preprocessing = parse_preprocessing(preprocessing)
        self.index = index
        self.seed, self.nlist, self.nprobe, self.pq_m = seed, nlist, nprobe, pq_m
        self.fit_sample, self.familiar = fit_sample, familiar

    def fit(self, features: np.ndarray | torch.Tensor,
            labels: np.ndarray | torch.Tensor) -> KNNBank:
        """Fit the pre-processing on the labelled bank and index it."""
        return self.fit_chunks([(features, labels)])

    def fit_chunks(self, chunks: Iterable[tuple[Any, Any]]) -> KNNBank:
        """The bank from chunks of ``(features, labels)``, never one array."""
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
        # Sun et al. 2022: how far an input lies from every training image
        self.familiar_ = Familiarity(sample.shape[1]) if self.familiar else None
        for f, y in itertools.chain(head, it):
            f = np.asarray(f, np.float32)
            self.index_.add(self.preprocessor_.transform(f), np.asarray(y))
            if self.familiar_ is not None:
                self.familiar_.add(f)
        return self

    def kneighbors(self, features: np.ndarray | torch.Tensor) -> Neighbours:
        """The k nearest bank entries of pre-processed ``features`` (one search)."""
        self._check_fitted()
        d2, labels = self.index_.search(
            self.preprocessor_.transform(np.asarray(features, dtype=np.float32)), self.k)
        return Neighbours(d2, labels)

    def scores(self, features: np.ndarray | torch.Tensor,
               classes: np.ndarray | torch.Tensor) -> np.ndarray:
        """``s(q, classes[q])`` for feature rows ``features`` (SPEC B3)."""
        return self.kneighbors(features).scores(classes, self.weighting)

    def class_centroids(self) -> np.ndarray:
        """Mean pre-processed bank vector of every class (classes × d)."""
        self._check_fitted()
        bank, labels = self.index_.vectors(), self.index_.labels
        return np.stack([bank[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    def distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Squared distance of each row's normalised features to the nearest bank vector."""
        if getattr(self, "familiar_", None) is None:
            raise InputError("this detector was saved without its bank distances: fit it again")
        return self.familiar_.distance(np.asarray(features))  # type: ignore[union-attr]

    def state(self) -> dict[str, torch.Tensor]:
        """The FAISS index (its own serialisation, the bank stored once), the labels, the
        bank distances and the fitted pre-processing, as tensors."""
        self._check_fitted()
        tensors = {"index": torch.from_numpy(self.index_.to_bytes()),
                   "labels": torch.from_numpy(self.index_.labels)}
        if self.familiar_ is not None:
            tensors["familiar"] = torch.from_numpy(self.familiar_.to_bytes())
        tensors.update({f"pre.{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.preprocessor_.state().items()})
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], where: str = "the file") -> KNNBank:
        if "labels" not in tensors:
            raise CheckpointError(f"{where} holds no feature bank")
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
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise InputError("the kNN bank is not fitted: call fit(features, labels) first")
