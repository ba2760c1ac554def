"""The searchable bank of deep features: FAISS, exact flat L2 by default, IVF for large banks.

FAISS holds the only copy of the vectors; labels sit beside it, indexed by FAISS's ids.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from advguard.errors import CheckpointError, InputError

INDEX_KINDS = ("flat", "ivf")


class FeatureIndex:
    """``add``-once bank of (features, labels); ``search(q, k) -> (squared L2 distances, labels)``.

    ``kind="flat"`` is exact; ``kind="ivf"`` clusters the bank into ``nlist`` cells and searches
    ``nprobe`` of them (approximate, faster on large banks).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, kind: str = "flat",
                 nlist: int = 256, nprobe: int = 16, seed: int = 0) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) != len(labels) or len(features) == 0:
            raise InputError(f"the bank must be (n, d) features with n ≥ 1 labels, got "
                             f"{features.shape} and {len(labels)} labels")
        if kind not in INDEX_KINDS:
            raise InputError(f"unknown index {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.kind = kind
        d = features.shape[1]
        self.index: Any
        if kind == "flat":
            self.index = faiss.IndexFlatL2(d)
        else:
            nlist = max(1, min(nlist, len(features) // 39))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            self.index.cp.seed = seed
            self.index.train(features)
            self.index.nprobe = min(nprobe, nlist)
        self.index.add(features)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        """Memory held by the bank: FAISS's codes (+ ids and centroids for IVF) and labels."""
        codes = len(self) * self.index.sa_code_size()
        if self.kind == "ivf":
            codes += len(self) * 8 + self.index.nlist * self.dim * 4
        return int(codes + self.labels.nbytes)

    def vectors(self) -> np.ndarray:
        """The bank's vectors (n, d), reconstructed from FAISS (a copy)."""
        if self.kind == "ivf":
            self.index.make_direct_map()
        return np.asarray(self.index.reconstruct_n(0, len(self)), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries must be (n, {self.dim}), got {q.shape}")
        k = min(k, len(self))
        distances, ids = self.index.search(q, k)
        labels = np.where(ids >= 0, self.labels[np.maximum(ids, 0)], -1)
        return distances, labels

    def to_bytes(self) -> np.ndarray:
        """FAISS's own serialisation of the index (uint8), for safetensors files."""
        return np.asarray(faiss.serialize_index(self.index), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, data: np.ndarray, labels: np.ndarray, kind: str) -> FeatureIndex:
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise CheckpointError(f"corrupt FAISS index: {str(exc).splitlines()[0]}") from None
        if index.ntotal != len(labels):
            raise CheckpointError(f"the stored index holds {index.ntotal} vectors but "
                                  f"{len(labels)} labels")
        out = cls.__new__(cls)
        out.index, out.labels, out.kind = index, np.asarray(labels, dtype=np.int64), kind
        return out
