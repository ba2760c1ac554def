"""The searchable bank of deep features: FAISS, exact flat L2 by default, IVF-Flat and IVF-PQ for
banks too large for exact search.

FAISS holds the only copy of the vectors; labels sit beside it, indexed by FAISS's ids. A bank
is filled in chunks (``train`` on a sample, then ``add`` chunk by chunk), so it is never built
from one array of the whole dataset.

=========  =============================  ====================================================
kind       FAISS index                    trade-off
=========  =============================  ====================================================
``flat``   ``IndexFlatL2``                exact; ``4·d`` bytes a vector; time ∝ bank size
``ivf``    ``IndexIVFFlat``               the bank split into ``nlist`` cells, ``nprobe`` of
                                          them searched: ~``nprobe/nlist`` of the distance
                                          work, exact distances, misses neighbours in cells
                                          not probed; ``4·d + 8`` bytes a vector
``ivfpq``  ``IndexIVFPQ`` (8-bit codes)   as ``ivf``, vectors compressed to ``m`` bytes by
                                          product quantisation: approximate distances too,
                                          ``m + 8`` bytes a vector
=========  =============================  ====================================================
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from advguard.errors import CheckpointError, InputError
from advguard.options import check_int

INDEX_KINDS = ("flat", "ivf", "ivfpq")
MIN_POINTS_PER_CELL = 39  # FAISS warns below this many training points per IVF cell


def _as_matrix(x: np.ndarray, dim: int | None = None, what: str = "features") -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise InputError(f"{what} must be (n, {dim or 'd'}), got {x.shape}")
    return x


class FeatureIndex:
    """A bank of (features, labels); ``search(q, k) -> (squared L2 distances, labels)``.

    ``nlist`` IVF cells (at most one per 39 training vectors), ``nprobe`` searched;
    ``pq_m`` bytes per vector for ``ivfpq`` (a divisor of the dimension; default: the largest
    divisor ≤ d/2, so each sub-quantiser covers ≥ 2 dimensions)."""

    def __init__(self, dim: int, kind: str = "flat", *, nlist: int = 1024, nprobe: int = 16,
                 pq_m: int | None = None, seed: int = 0) -> None:
        if kind not in INDEX_KINDS:
            raise InputError(f"unknown index {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        check_int("the feature dimension", dim)
        self.kind, self.dim, self.nlist, self.nprobe, self.seed = kind, dim, nlist, nprobe, seed
        self.pq_m = pq_m or max(m for m in range(1, max(dim // 2, 1) + 1) if dim % m == 0)
        if dim % self.pq_m:
            raise InputError(f"pq_m={self.pq_m} must divide the feature dimension {dim}")
        self.index: Any = faiss.IndexFlatL2(dim) if kind == "flat" else None
        self._labels: list[np.ndarray] = []

    @classmethod
    def build(cls, features: np.ndarray, labels: np.ndarray, kind: str = "flat",
              **kw: Any) -> FeatureIndex:
        """A bank of all ``features`` at once (trained on them if it is an IVF kind)."""
        f = _as_matrix(features)
        if len(f) == 0 or len(f) != len(labels):
            raise InputError(f"the bank must be (n, d) features with n ≥ 1 labels, got "
                             f"{f.shape} and {len(labels)} labels")
        out = cls(f.shape[1], kind, **kw)
        out.train(f)
        out.add(f, labels)
        return out

    @property
    def trained(self) -> bool:
        return self.index is not None

    def train(self, sample: np.ndarray) -> FeatureIndex:
        """Learn the IVF cells (and PQ codebooks) from a sample of the bank; a no-op for flat."""
        if self.kind == "flat":
            return self
        x = _as_matrix(sample, self.dim, "the training sample")
        nlist = max(1, min(self.nlist, len(x) // MIN_POINTS_PER_CELL))
        quantizer = faiss.IndexFlatL2(self.dim)
        index: Any
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist)
        else:
            if len(x) < 256:
                raise InputError(f"IVF-PQ needs at least 256 training vectors, got {len(x)}")
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.pq_m, 8)
        index.cp.seed = self.seed
        index.train(x)
        index.nprobe = min(self.nprobe, nlist)
        self.index = index
        return self

    def add(self, features: np.ndarray, labels: np.ndarray) -> FeatureIndex:
        """Append a chunk of the bank (after ``train`` for the IVF kinds)."""
        if not self.trained:
            raise InputError("train the IVF index on a sample before adding vectors")
        x = _as_matrix(features, self.dim)
        labels = np.asarray(labels, dtype=np.int64).ravel()
        if len(labels) != len(x):
            raise InputError(f"{len(x)} vectors but {len(labels)} labels")
        self.index.add(x)
        self._labels.append(labels)
        return self

    @property
    def labels(self) -> np.ndarray:
        if len(self._labels) != 1:
            self._labels = [np.concatenate(self._labels) if self._labels
                            else np.zeros(0, np.int64)]
        return self._labels[0]

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        """Memory of the bank: FAISS's own serialisation of the index (codes, ids, centroids,
        codebooks) and the labels."""
        return int(len(faiss.serialize_index(self.index)) + self.labels.nbytes)

    def vectors(self) -> np.ndarray:
        """The bank's vectors (n, d), reconstructed from FAISS (a copy; approximate for PQ)."""
        if self.kind != "flat":
            self.index.make_direct_map()
        return np.asarray(self.index.reconstruct_n(0, len(self)), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            raise InputError("the bank is empty")
        q = _as_matrix(queries, self.dim, "queries")
        distances, ids = self.index.search(q, min(k, len(self)))
        labels = np.where(ids >= 0, self.labels[np.maximum(ids, 0)], -1)
        return distances, labels

    def search_ids(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The bank ids of the ``k`` nearest vectors (−1 where fewer were found)."""
        return self.index.search(_as_matrix(queries, self.dim, "queries"), min(k, len(self)))[1]

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
        out = cls(int(index.d), kind if kind in INDEX_KINDS else "flat")
        out.index = index
        out._labels = [np.asarray(labels, dtype=np.int64)]
        return out
