"""Stateful detection of query-based black-box attacks (Chen, Carlini & Wagner 2019, "Stateful
detection of black-box adversarial attacks").

A query-based attacker (Square, SimBA, HopSkipJump, Boundary) sends hundreds to thousands of
near-copies of one image; an honest client sends different images. Each query is encoded
compactly (:func:`encode`: the image at full resolution up to 32×32 per channel, centred and
scaled to unit length — brightness and contrast cancel — then a fixed random projection to 256
numbers, which keeps distances (Johnson–Lindenstrauss), stored as float16: 512 bytes a query
whatever the image size) and kept in its client's bounded history (``history`` queries,
``ttl_s`` seconds; the stores of :mod:`advguard.serve.stores` hold it beside the denial
state). A query whose mean distance to its ``k`` nearest earlier queries of the same client
falls below ``threshold`` is an *attack-process detection* (:func:`repeats`). The threshold
is calibrated by :func:`calibrate` on distinct held-out images to a stated false-alarm rate
per benign query.

Each client's first ``k`` queries are not tested (the mean needs ``k`` neighbours), and a query
identical to one the client already sent (an app that retries) is never a detection: it tells an
attacker nothing new. A client that spreads its queries over many API keys has a history per
key (docs/SERVING.md says what this does and does not stop).

The encoding and ``k`` were chosen on validation traffic (Square streams and augmented honest
streams on MNIST training images, none of the test images the benchmarks report): Square at
ε = 0.3 redraws large squares of ±ε stripes, which the earlier 8×8 pooled encoding averaged
away; docs/SERVING.md ("The query watch") has the comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advguard.errors import InputError
from advguard.options import check_at_least, check_fraction, option

SIDE = 32  # images larger than SIDE × SIDE are average-pooled to it before encoding
DIMS = 256  # the random projection's size: a query's code is DIMS float16 numbers
# the encoding's name, with a fingerprint of the projection's random stream (a numpy whose
# generator drew other numbers would encode otherwise): a watch calibrated for another
# encoding is not used
ENCODING = (f"pixels{SIDE}-projection{DIMS}-"
            + hashlib.sha256(np.random.default_rng(0).standard_normal(8).tobytes())
            .hexdigest()[:8])


@dataclass(frozen=True)
class QueryWatch:
    """How each client's queries are watched (``threshold``: set by :func:`calibrate`)."""

    query_k: int = option(5, "earlier queries of the client a new query is compared with")
    query_history: int = option(1000, "queries kept per client")
    query_ttl_s: float = option(86400.0, "seconds a query stays in its client's history")
    query_false_alarm: float = option(0.001, "false-alarm rate per benign query the "
                                             "threshold is calibrated to")
    query_global: int = option(5000, "newest queries of every client kept in the account-"
                                     "oblivious index (a query near-copying another key's "
                                     "links the keys); 0: off")
    threshold: float | None = option(None, "mean distance below which a query is a detection "
                                           "(calibrated)", cli=False)
    global_threshold: float | None = option(None, "the same against the account-oblivious "
                                                  "index (calibrated for its size)", cli=False)
    encoding: str = option(ENCODING, "the encoding the threshold was calibrated for",
                           cli=False)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "query_k", "query_history")
        check_at_least(self, 0, "query_global")
        if 0 < self.query_global < self.query_k:
            raise InputError(f"query_global ({self.query_global}) must be 0 (off) or at least "
                             f"query_k ({self.query_k})")
        if self.query_k > self.query_history:
            raise InputError(f"query_k ({self.query_k}) cannot exceed the history "
                             f"({self.query_history})")
        check_fraction("query_false_alarm", self.query_false_alarm)
        if not 0 < self.query_ttl_s < math.inf:
            raise InputError(f"query_ttl_s must be a finite number > 0, got "
                             f"{self.query_ttl_s!r}")
        for name in ("threshold", "global_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")

    @property
    def linking(self) -> bool:
        """Whether queries are also compared across clients (the global index)."""
        return self.query_global > 0 and self.global_threshold is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encode(x: torch.Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [0, 1] → float16 codes ``(N, DIMS)``: each image (average-
    pooled to at most ``SIDE`` × ``SIDE``) minus its mean, scaled to unit length and projected
    by a fixed random matrix, so a code's length stays near 1 and distances are kept (a blank
    image codes as zeros)."""
    if x.dim() != 4:
        raise InputError(f"encode takes a batch (N, C, H, W), got shape {tuple(x.shape)}")
    z = x.detach().float().cpu()
    if z.shape[-2] > SIDE or z.shape[-1] > SIDE:
        z = F.adaptive_avg_pool2d(z, (min(SIDE, z.shape[-2]), min(SIDE, z.shape[-1])))
    a = z.flatten(1).numpy()  # NumPy from here: cheaper than torch on one small image
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    a = np.where(norm > 1e-6, a / np.maximum(norm, 1e-6), 0).astype(np.float32)
    return (a @ _projection(a.shape[1])).astype(np.float16)


@functools.lru_cache(maxsize=8)
def _projection(d: int) -> np.ndarray:
    """The fixed ``(d, DIMS)`` Gaussian projection (seeded: every server and replica encodes a
    query alike), scaled so that it keeps lengths on average."""
    return (np.random.default_rng(0).standard_normal((d, DIMS)) / math.sqrt(DIMS)).astype(
        np.float32)


def distances(history: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The L2 distances ``(len(codes), len(history))`` between codes and history rows."""
    h = np.asarray(history, dtype=np.float32).reshape(-1, codes.shape[1])
    q = np.asarray(codes, dtype=np.float32)
    d2 = (q * q).sum(1)[:, None] + (h * h).sum(1)[None, :] - 2 * q @ h.T
    return np.sqrt(np.maximum(d2, 0))


def mean_knn(history: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """For each code, its mean L2 distance to its ``k`` nearest rows of ``history`` (NaN while
    the history holds fewer than ``k``)."""
    d = distances(history, codes)
    if d.shape[1] < k:
        return np.full(len(codes), np.nan)
    return np.partition(d, k - 1, axis=1)[:, :k].mean(1)


def stack_history(history: Sequence[bytes | np.ndarray], dims: int) -> np.ndarray:
    """A client's stored codes (raw float16 bytes, as the stores keep them, or arrays) as one
    ``(n, dims)`` float16 array, leaving out codes of another length (kept from an earlier
    encoding until their TTL ends)."""
    raw = [h if isinstance(h, bytes) else np.asarray(h, dtype=np.float16).tobytes()
           for h in history]
    blob = b"".join(r for r in raw if len(r) == 2 * dims)
    return np.frombuffer(blob, dtype=np.float16).reshape(-1, dims)


def repeats(history: np.ndarray, codes: np.ndarray, watch: QueryWatch) -> np.ndarray:
    """Which of a request's ``codes`` are attack-process detections: each is compared with the
    client's history and the request's earlier codes (a batch of near-copies in one request
    detects itself), the newest ``watch.query_history`` of them."""
    if watch.threshold is None:
        raise InputError("the query watch has no threshold: calibrate it first")
    k, n = watch.query_k, len(history)
    seen = np.concatenate([np.asarray(history, dtype=np.float16).reshape(-1, codes.shape[1]),
                           np.asarray(codes, dtype=np.float16)])
    d = distances(seen, seen[n:])  # every code against the history and the request
    out = np.zeros(len(codes), dtype=bool)
    for i in range(len(codes)):
        lo, hi = max(0, n + i - watch.query_history), n + i  # what code i is compared with
        if hi - lo < k:
            continue  # too few to compare with
        row = d[i, lo:hi]
        close = lo + np.flatnonzero(row < 0.01)  # candidates for the very same image again
        if (seen[close] == seen[n + i]).all(1).any():  # sent before: tells nothing new
            continue
        out[i] = bool(np.partition(row, k - 1)[:k].mean() < watch.threshold)
    return out


def calibrate(codes: np.ndarray, watch: QueryWatch, seed: int = 0) -> QueryWatch:
    """``watch`` with the thresholds that flag a share ``query_false_alarm`` of benign queries:
    each of ``codes`` (distinct held-out images) is compared with a history of
    ``watch.query_history`` others drawn at random (the per-client threshold) and with one of
    ``watch.query_global`` others (the global index's, which compares a query with more
    queries and so needs a smaller threshold; both capped by the images there are), and each
    threshold is that quantile of the mean distances."""
    n = len(codes)
    if n < watch.query_k + 2:
        raise InputError(f"calibrating the query watch needs more than {watch.query_k + 1} images, "
                         f"got {n}")
    out = {"threshold": _quantile(codes, watch.query_history, watch, seed)}
    if watch.query_global:
        out["global_threshold"] = _quantile(codes, watch.query_global, watch, seed + 1)
    return QueryWatch(**{**asdict(watch), **out})


def _quantile(codes: np.ndarray, size: int, watch: QueryWatch, seed: int) -> float:
    n = len(codes)
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for start in range(0, n, 256):
        rows = np.arange(start, min(n, start + 256))
        others = rng.choice(n - 1, size=min(size, n - 1), replace=False)
        for r in rows:
            pick = others + (others >= r)  # any row but r itself
            stats[r] = mean_knn(codes[pick], codes[r][None], watch.query_k)[0]
    return float(np.quantile(stats, watch.query_false_alarm))


@dataclass
class Ring:
    """The account-oblivious index: the newest ``size`` queries of every client (Li et al.
    2022, "Blacklight": one store over all accounts, so spreading an attack over many keys does
    not hide it), as a store's process holds them. Rows come from the store in id order and
    leave by a rule every process applies alike (the newest ``size``, younger than the TTL),
    so a process reads only the rows added since its last read; ``generation`` changes when
    rows are deleted otherwise (an admin's clear), and a process that sees it change reads the
    index whole."""

    size: int
    ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clients: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=object))
    times: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    codes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, DIMS),
                                                                           dtype=np.float32))
    generation: str = ""

    @property
    def last_id(self) -> int:
        return int(self.ids[-1]) if len(self.ids) else 0

    def extend(self, rows: Sequence[tuple[int, str, float, bytes]], dims: int) -> None:
        """Add rows ``(id, client, time, code bytes)`` newer than the last one held, of codes
        of ``dims`` numbers (codes of another length, from another encoding, are left out)."""
        if self.codes.shape[1] != dims:
            self.reset(self.generation, dims)
        rows = [r for r in rows if len(r[3]) == 2 * dims and r[0] > self.last_id]
        if not rows:
            return
        self.ids = np.concatenate([self.ids, np.array([r[0] for r in rows], dtype=np.int64)])
        self.clients = np.concatenate([self.clients, np.array([r[1] for r in rows],
                                                              dtype=object)])
        self.times = np.concatenate([self.times, np.array([r[2] for r in rows])])
        new = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float16).reshape(-1, dims)
        self.codes = np.concatenate([self.codes, new.astype(np.float32)])

    def trim(self, now: float, ttl_s: float) -> None:
        keep = np.zeros(len(self.ids), dtype=bool)
        keep[-self.size:] = True
        keep &= self.times > now - ttl_s
        if not keep.all():
            self.ids, self.clients = self.ids[keep], self.clients[keep]
            self.times, self.codes = self.times[keep], self.codes[keep]

    def reset(self, generation: str, dims: int = DIMS) -> None:
        """Forget every row (the store's index changed otherwise than by the rule)."""
        fresh = Ring(self.size, generation=generation,
                     codes=np.zeros((0, dims), dtype=np.float32))
        self.ids, self.clients, self.times, self.codes = (fresh.ids, fresh.clients, fresh.times,
                                                          fresh.codes)
        self.generation = generation


def links(ring: Ring, client: str, codes: np.ndarray, watch: QueryWatch
          ) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Which of a request's ``codes`` are near-copies of *other* clients' recent queries (the
    global index: mean distance to their ``query_k`` nearest below ``global_threshold``), and
    for each such code the clients of those nearest queries; a code identical to one in the
    index tells nothing new and is not a detection."""
    found = np.zeros(len(codes), dtype=bool)
    linked: list[tuple[str, ...]] = [() for _ in codes]
    if not watch.linking or not len(ring.ids):
        return found, linked
    other = ring.clients != client
    k = watch.query_k
    if other.sum() < k:
        return found, linked
    index, owners = ring.codes[other], ring.clients[other]
    d = distances(index, np.asarray(codes, dtype=np.float32))
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
    assert watch.global_threshold is not None
    for i in range(len(codes)):
        row = d[i, nearest[i]]
        close = d[i] < 0.01  # candidates for the very same image again: no new information
        if close.any() and (index[close] == codes[i].astype(np.float32)).all(1).any():
            continue
        if row.mean() < watch.global_threshold:
            found[i] = True
            linked[i] = tuple(sorted(set(owners[nearest[i]].tolist())))
    return found, linked



def detect(history: np.ndarray, codes: np.ndarray, watch: QueryWatch, ring: Ring | None = None,
           client: str = "") -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """The attack-process detections among a request's ``codes``: near-copies of the client's
    own history (:func:`repeats`) or, with ``ring``, of other clients' recent queries
    (:func:`links`, which names the clients they link to)."""
    own = repeats(history, codes, watch)
    if ring is None:
        return own, [() for _ in codes]
    cross, linked = links(ring, client, codes, watch)
    return own | cross, linked


__all__ = ["ENCODING", "QueryWatch", "Ring", "calibrate", "detect", "encode", "links", "mean_knn",
           "repeats", "stack_history"]
