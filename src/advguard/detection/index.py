"""The searchable bank of deep features: FAISS, exact flat L2 by default, IVF for large banks."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from advguard.errors import InputError


class FeatureIndex:
    """``add``-once bank of (features, labels); ``search(q, k) -> (squared L2 distances, labels)``.

    ``kind="flat"`` is exact; ``kind="ivf"`` clusters the bank into ``nlist`` cells and searches
    ``nprobe`` of them (approximate, faster on large banks).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, kind: str = "flat",
                 nlist: int = 256, nprobe: int = 16, seed: int = 0) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) != len(labels):
            raise InputError(f"the bank must be (n, d) features with n labels, got "
                             f"{features.shape} and {len(labels)} labels")
        self.features, self.labels = features, np.asarray(labels, dtype=np.int64)
        self.kind, self.nlist, self.nprobe = kind, nlist, nprobe
        d = features.shape[1]
        self.index: Any
        if kind == "flat":
            self.index = faiss.IndexFlatL2(d)
        elif kind == "ivf":
            nlist = max(1, min(nlist, len(features) // 39))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            self.index.cp.seed = seed
            self.index.train(features)
            self.index.nprobe = min(nprobe, nlist)
        else:
            raise InputError(f"unknown index {kind!r}; choose 'flat' or 'ivf'")
        self.index.add(features)

    @property
    def nbytes(self) -> int:
        """Memory held by the bank's vectors and labels."""
        return int(self.features.nbytes + self.labels.nbytes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.features.shape[1]:
            raise InputError(f"queries must be (n, {self.features.shape[1]}), got {q.shape}")
        k = min(k, len(self.features))
        distances, ids = self.index.search(q, k)
        labels = np.where(ids >= 0, self.labels[np.maximum(ids, 0)], -1)
        return distances, labels
