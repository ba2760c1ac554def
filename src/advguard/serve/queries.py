"""Stateful detection of query-based black-box attacks (Chen, Carlini & Wagner 2019, "Stateful
detection of black-box adversarial attacks"), made to hold against an attacker who knows it:
query blinding, many keys, and the watch's own answers as an oracle (OARS, Feng et al. 2023).

A query-based attacker (Square, SimBA, HopSkipJump, Boundary) sends hundreds to thousands of
queries that all lie within the ε-ball of one image; an honest client sends different images —
or, a camera, near-copies of one scene. Each query is encoded (:func:`encode`) in two views: a
fixed random projection of the centred, unit-length image (``DIMS`` numbers: L2 distances kept,
brightness and contrast cancel) and its pixels pooled to at most ``VIEW`` values (the *pixel
view*: a perturbation within ε in L∞ stays within ε there, so blinding noise inside the ball
cannot move a query out of it). A query is a detection (:func:`scan`) when the mean L2 distance
of its projection to its ``k`` nearest earlier queries falls below ``threshold``, or when ``k``
earlier queries lie within ``view_threshold`` of it in L∞ in the pixel view; both thresholds are
calibrated by :func:`calibrate` on distinct held-out images to a stated false-alarm rate.

Queries are compared with their client's bounded history (``query_history`` queries,
``query_ttl_s`` seconds) and, account-obliviously (Li et al. 2022, "Blacklight"), with the
newest ``query_global`` queries of every client (:class:`Ring`, thresholds of its own), each
kept with the answer it was given. **A detection is answered as the query it copies was**
(:func:`detect`): a near-copy tells an attacker nothing its earlier answer did not — whether it
was blinded or sent under another key — while a camera's frames keep getting their scene's
answer. The very same image sent again (an app that retries) is answered as it was and is no
detection. The stores of :mod:`advguard.serve.stores` keep the histories beside each client's
record; :mod:`advguard.serve.state` counts what the findings add up to.

The projection and ``k`` were chosen on validation traffic (Square streams and augmented honest
streams on MNIST training images, none of the test images the benchmarks report); the pixel
view was added for blinded streams of the same kind (``benchmarks/choose_flip_limit.py``);
docs/SERVING.md ("The query watch") has both.
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

from advguard import options
from advguard.errors import InputError
from advguard.options import check_at_least, check_fraction, option

SIDE = 32  # images larger than SIDE × SIDE are average-pooled to it before encoding
DIMS = 256  # the random projection's size: a code's first DIMS float16 numbers
VIEW = 1024  # the pixel view's most values (32×32 grey; colour is pooled to 18×18×3)
# the encoding's name, with a fingerprint of the projection's random stream (a numpy whose
# generator drew other numbers would encode otherwise): a watch calibrated for another
# encoding is not used
ENCODING = (f"pixels{SIDE}-projection{DIMS}-view{VIEW}-"
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
    query_eps: float | None = option(
        None, "the L∞ radius of the attacks to watch for (e.g. 0.3 or 8/255): a query is a "
              "detection when query_k earlier ones lie within 2ε of it in the pixel view — the "
              "ball every query of one attack stays in — and the calibrated thresholds are not "
              "used (fewer false alarms on distinct images); default: both views calibrated",
        parse=options.strength)
    query_global: int = option(5000, "newest queries of every client kept in the account-"
                                     "oblivious index (a query near-copying another key's "
                                     "links the keys); 0: off")
    threshold: float | None = option(None, "mean distance below which a query is a detection "
                                           "(calibrated)", cli=False)
    global_threshold: float | None = option(None, "the same against the account-oblivious "
                                                  "index (calibrated for its size)", cli=False)
    view_threshold: float | None = option(None, "L∞ distance in the pixel view within which "
                                                "query_k earlier queries make a detection "
                                                "(calibrated)", cli=False)
    global_view_threshold: float | None = option(None, "the same against the global index",
                                                 cli=False)
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
        if self.query_eps is not None and not 0 < self.query_eps <= 1:
            raise InputError(f"query_eps must be in (0, 1], got {self.query_eps!r}")
        for name in ("threshold", "global_threshold", "view_threshold",
                     "global_view_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")

    @property
    def linking(self) -> bool:
        """Whether queries are also compared across clients (the global index)."""
        return self.query_global > 0 and (self.global_threshold is not None
                                          or self.global_view_threshold is not None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encode(x: torch.Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [0, 1] → float16 codes ``(N, DIMS + V)``, two views of each
    image: first, the image (average-pooled to at most ``SIDE`` × ``SIDE``) minus its mean,
    scaled to unit length and projected by a fixed random matrix to ``DIMS`` numbers, so
    distances are kept and brightness and contrast cancel (a blank image projects to zeros);
    then its pixels, average-pooled to at most ``VIEW`` values (the *pixel view*: any
    perturbation within ε in L∞ stays within ε there, averaging cannot enlarge it)."""
    if x.dim() != 4:
        raise InputError(f"encode takes a batch (N, C, H, W), got shape {tuple(x.shape)}")
    z = x.detach().float().cpu()
    if z.shape[-2] > SIDE or z.shape[-1] > SIDE:
        z = F.adaptive_avg_pool2d(z, (min(SIDE, z.shape[-2]), min(SIDE, z.shape[-1])))
    side = max(1, math.isqrt(VIEW // z.shape[1]))
    view = z if z.shape[1] * z.shape[2] * z.shape[3] <= VIEW else F.adaptive_avg_pool2d(
        z, (min(side, z.shape[-2]), min(side, z.shape[-1])))
    a = z.flatten(1).numpy()  # NumPy from here: cheaper than torch on one small image
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    a = np.where(norm > 1e-6, a / np.maximum(norm, 1e-6), 0).astype(np.float32)
    return np.concatenate([a @ _projection(a.shape[1]), view.flatten(1).numpy()],
                          axis=1).astype(np.float16)


@functools.lru_cache(maxsize=8)
def _projection(d: int) -> np.ndarray:
    """The fixed ``(d, DIMS)`` Gaussian projection (seeded: every server and replica encodes a
    query alike), scaled so that it keeps lengths on average."""
    return (np.random.default_rng(0).standard_normal((d, DIMS)) / math.sqrt(DIMS)).astype(
        np.float32)


def split(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes' two views as float32: the projection and the pixel view (None for codes of
    ``DIMS`` numbers or fewer, which have only the first)."""
    c = np.asarray(codes, dtype=np.float32)
    if c.shape[-1] <= DIMS:
        return c, None
    return c[..., :DIMS], c[..., DIMS:]


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


CHUNK = 16  # pixel-view values averaged into one number of the cheap L∞ bound


@dataclass(frozen=True)
class Bank:
    """Codes prepared for comparison: the raw float16 rows (to tell the very same image), the
    projection, its squared norms, the pixel view and its chunk means (the largest gap between
    two views' means over ``CHUNK`` values never exceeds their L∞ distance: a cheap bound that
    rules most pairs out before the exact distance is taken)."""

    raw: np.ndarray  # (n, D) float16
    proj: np.ndarray  # (n, DIMS) float32
    norms: np.ndarray  # (n,) float32
    view: np.ndarray | None  # (n, V) float32
    chunks: np.ndarray | None  # (n, V // CHUNK) float32

    @classmethod
    def of(cls, codes: np.ndarray) -> Bank:
        raw = np.asarray(codes, dtype=np.float16)
        proj, view = split(raw)
        chunks = None
        if view is not None and view.shape[1] >= 4 * CHUNK:
            g = view.shape[1] // CHUNK * CHUNK
            chunks = view[:, :g].reshape(len(view), g // CHUNK, CHUNK).mean(2)
        return cls(raw, proj, (proj * proj).sum(1), view, chunks)

    def __len__(self) -> int:
        return len(self.raw)

    def __add__(self, other: Bank) -> Bank:
        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return Bank(np.concatenate([self.raw, other.raw]), np.concatenate([self.proj, other.proj]),
                    np.concatenate([self.norms, other.norms]), cat(self.view, other.view),
                    cat(self.chunks, other.chunks))

    def __getitem__(self, keep: slice | np.ndarray) -> Bank:
        return Bank(self.raw[keep], self.proj[keep], self.norms[keep],
                    None if self.view is None else self.view[keep],
                    None if self.chunks is None else self.chunks[keep])

    def l2(self, q: Bank) -> np.ndarray:
        """L2 distances ``(len(q), len(self))`` between projections."""
        d2 = q.norms[:, None] + self.norms[None, :] - 2 * q.proj @ self.proj.T
        return np.sqrt(np.maximum(d2, 0))

    def linf(self, q: Bank, i: int, rows: np.ndarray, below: float) -> np.ndarray:
        """The L∞ distances in the pixel view from query ``i`` of ``q`` to ``rows`` of this
        bank, exact where they can be below ``below`` (the rest ``inf``)."""
        assert self.view is not None and q.view is not None
        out = np.full(len(rows), np.inf, dtype=np.float32)
        near = np.arange(len(rows))
        if self.chunks is not None and q.chunks is not None:
            near = np.flatnonzero(np.abs(self.chunks[rows] - q.chunks[i]).max(1) <= below)
        if len(near):
            out[near] = np.abs(self.view[rows[near]] - q.view[i]).max(1)
        return out


@dataclass(frozen=True)
class Scan:
    """What the watch finds of a request's queries against what it is compared with."""

    found: np.ndarray  # (n,) bool: attack-process detections
    # (n,) int: the row each query is answered as (a near-copy, or the very same image
    # again), in the order compared — the bank, then the request's earlier queries; -1: a
    # fresh answer
    match: np.ndarray
    near: list[np.ndarray]  # per query, the rows of its nearest (those that detected it)


def scan(bank: Bank, codes: np.ndarray, k: int, window: int, threshold: float | None,
         view_threshold: float | None, *, within: bool = True,
         skip: np.ndarray | None = None) -> Scan:
    """Each of ``codes`` compared with the ``bank`` (and, ``within``, with the request's
    earlier codes: a batch of near-copies detects itself), the newest ``window`` of them, less
    the rows ``skip`` marks: a detection when the mean L2 distance of its projection to its
    ``k`` nearest is below ``threshold`` or when ``k`` of them lie within ``view_threshold`` of
    it in L∞ in the pixel view (the ε-ball every query of one attack stays in, blinding noise
    included). A detection is answered as its nearest (in the view that detected it); the very
    same image sent again is answered as it was and is no detection (it tells nothing new)."""
    q = Bank.of(codes)
    n = len(bank)
    seen = bank + q if within else bank
    d = seen.l2(q)
    if skip is not None:
        d[:, :n][:, skip] = np.inf
    use_view = view_threshold is not None and seen.view is not None and q.view is not None
    found = np.zeros(len(codes), dtype=bool)
    match = np.full(len(codes), -1)
    near: list[np.ndarray] = [np.zeros(0, dtype=int) for _ in range(len(codes))]
    for i in range(len(codes)):
        hi = n + i if within else n
        lo = max(0, hi - window)  # what code i is compared with
        row = d[i, lo:hi]
        rows = lo + np.flatnonzero(np.isfinite(row))
        close = lo + np.flatnonzero(row < 0.01)  # candidates for the very same image again
        same = close[(seen.raw[close].view(np.uint16) == q.raw[i].view(np.uint16)).all(1)]
        if len(same):  # sent before: answered as it was, and tells nothing new
            match[i] = same[-1]
            continue
        if len(rows) < k:
            continue  # too few to compare with
        if use_view:
            assert view_threshold is not None
            dv = seen.linf(q, i, rows, view_threshold)
            inside = np.argpartition(dv, k - 1)[:k]
            if dv[inside].max() < view_threshold:
                found[i], match[i], near[i] = True, rows[int(np.argmin(dv))], rows[inside]
                continue
        nearest = np.argpartition(d[i, rows], k - 1)[:k]
        if threshold is not None and d[i, rows[nearest]].mean() < threshold:
            found[i], match[i], near[i] = True, rows[int(np.argmin(d[i, rows]))], rows[nearest]
    return Scan(found, match, near)


def repeats(history: np.ndarray | Bank, codes: np.ndarray, watch: QueryWatch) -> np.ndarray:
    """Which of a request's ``codes`` are attack-process detections against the client's
    history and the request's earlier codes (:func:`scan` with the per-client thresholds)."""
    return own(history, codes, watch).found


def own(history: np.ndarray | Bank, codes: np.ndarray, watch: QueryWatch) -> Scan:
    """:func:`scan` of a request's ``codes`` against its client's history (codes, or a bank
    prepared from them)."""
    if watch.threshold is None and watch.view_threshold is None:
        raise InputError("the query watch has no threshold: calibrate it first")
    if not isinstance(history, Bank):
        history = Bank.of(np.asarray(history, dtype=np.float16).reshape(-1, codes.shape[1]))
    return scan(history, codes, watch.query_k, watch.query_history, watch.threshold,
                watch.view_threshold)


def calibrate(codes: np.ndarray, watch: QueryWatch, seed: int = 0) -> QueryWatch:
    """``watch`` with the thresholds that flag a share ``query_false_alarm`` of benign queries:
    each of ``codes`` (distinct held-out images) is compared with a history of
    ``watch.query_history`` others drawn at random (the per-client thresholds) and with one of
    ``watch.query_global`` others (the global index's, which compares a query with more
    queries and so needs smaller thresholds; both capped by the images there are); each
    threshold is that quantile of the mean L2 distance to the ``query_k`` nearest projections,
    and of the L∞ distance to the ``query_k``-th nearest pixel view."""
    n = len(codes)
    if watch.query_eps is not None:  # the ball of the threat model, float16's rounding beside
        ball = 2 * watch.query_eps + 2 ** -10
        return QueryWatch(**{**asdict(watch), "threshold": None, "global_threshold": None,
                             "view_threshold": ball,
                             "global_view_threshold": ball if watch.query_global else None})
    if n < watch.query_k + 2:
        raise InputError(f"calibrating the query watch needs more than {watch.query_k + 1} images, "
                         f"got {n}")
    out = dict(zip(("threshold", "view_threshold"),
                   _quantiles(codes, watch.query_history, watch, seed), strict=True))
    if watch.query_global:
        out.update(zip(("global_threshold", "global_view_threshold"),
                       _quantiles(codes, watch.query_global, watch, seed + 1), strict=True))
    return QueryWatch(**{**asdict(watch), **out})


VIEW_ROWS = 2000  # calibration images the pixel view's thresholds are measured on (at most)


def _quantiles(codes: np.ndarray, size: int, watch: QueryWatch, seed: int
               ) -> tuple[float, float | None]:
    n, k = len(codes), watch.query_k
    rng = np.random.default_rng(seed)
    proj, view = split(codes)
    stats, vstats = np.empty(n), np.full(n, np.nan)
    for start in range(0, n, 256):
        rows = np.arange(start, min(n, start + 256))
        others = rng.choice(n - 1, size=min(size, n - 1), replace=False)
        for r in rows:
            pick = others + (others >= r)  # any row but r itself
            stats[r] = mean_knn(proj[pick], proj[r][None], k)[0]
            if view is not None and r < VIEW_ROWS:
                vstats[r] = np.partition(np.abs(view[pick] - view[r]).max(1), k - 1)[k - 1]
    q = watch.query_false_alarm
    return (float(np.quantile(stats, q)),
            None if view is None else float(np.nanquantile(vstats, q)))


@dataclass
class Ring:
    """The account-oblivious index: the newest ``size`` queries of every client (Li et al.
    2022, "Blacklight": one store over all accounts, so spreading an attack over many keys does
    not hide it), with the answer each was given, as a store's process holds them. Rows come
    from the store in id order and leave by a rule every process applies alike (the newest
    ``size``, younger than the TTL), so a process reads only the rows added since its last
    read; ``generation`` changes when rows are deleted otherwise (an admin's clear), and a
    process that sees it change reads the index whole."""

    size: int
    ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clients: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=object))
    times: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    bank: Bank = dataclasses.field(default_factory=lambda: Bank.of(np.zeros((0, DIMS))))
    answers: list[str] = dataclasses.field(default_factory=list)
    generation: str = ""

    @property
    def last_id(self) -> int:
        return int(self.ids[-1]) if len(self.ids) else 0

    def extend(self, rows: Sequence[tuple[int, str, float, bytes, str]], dims: int) -> None:
        """Add rows ``(id, client, time, code bytes, answer)`` newer than the last one held, of
        codes of ``dims`` numbers (codes of another length, from another encoding, are left
        out)."""
        if self.bank.raw.shape[1] != dims:
            self.reset(self.generation, dims)
        rows = [r for r in rows if len(r[3]) == 2 * dims and r[0] > self.last_id]
        if not rows:
            return
        self.ids = np.concatenate([self.ids, np.array([r[0] for r in rows], dtype=np.int64)])
        self.clients = np.concatenate([self.clients, np.array([r[1] for r in rows],
                                                              dtype=object)])
        self.times = np.concatenate([self.times, np.array([r[2] for r in rows])])
        new = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float16).reshape(-1, dims)
        self.bank = self.bank + Bank.of(new)
        self.answers += [r[4] for r in rows]

    def trim(self, now: float, ttl_s: float) -> None:
        keep = np.zeros(len(self.ids), dtype=bool)
        keep[-self.size:] = True
        keep &= self.times > now - ttl_s
        if not keep.all():
            self.ids, self.clients = self.ids[keep], self.clients[keep]
            self.times, self.bank = self.times[keep], self.bank[keep]
            self.answers = [a for a, kept in zip(self.answers, keep, strict=True) if kept]

    def reset(self, generation: str, dims: int = DIMS) -> None:
        """Forget every row (the store's index changed otherwise than by the rule)."""
        self.ids, self.clients = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
        self.times, self.bank = np.zeros(0), Bank.of(np.zeros((0, dims)))
        self.answers, self.generation = [], generation


@dataclass(frozen=True)
class Found:
    """The watch's findings on one request: which queries are attack-process detections, the
    answer each query is to be given instead of a fresh one (a near-copy or a resend is
    answered as its nearest earlier query was; None: answered fresh), and the other clients
    each detection linked it to."""

    detections: np.ndarray  # (n,) bool
    answers: list[str | None]
    linked: list[tuple[str, ...]]


def detect(history: np.ndarray | Bank, history_answers: Sequence[str], codes: np.ndarray,
           answers: Sequence[str], watch: QueryWatch, ring: Ring | None = None,
           client: str = "") -> Found:
    """The watch on a request's ``codes`` (with the ``answers`` fresh from the model): each is
    compared with the client's history (:func:`own`) and, with ``ring``, with the other
    clients' recent queries (the global index, its own thresholds; a detection there names
    the clients of the queries that detected it). A query the watch matches is answered as
    the query it matched was — the client's own first, else another client's — so a
    near-copy tells an attacker nothing the earlier answer did not."""
    mine = own(history, codes, watch)
    given: list[str] = list(history_answers)
    out: list[str | None] = []
    for i in range(len(codes)):  # in order: a request's near-copies answer as its earlier ones
        m = int(mine.match[i])
        out.append(None if m < 0 else given[m])
        given.append(out[-1] if out[-1] is not None else answers[i])
    found = mine.found.copy()
    linked: list[tuple[str, ...]] = [() for _ in codes]
    if ring is None or not watch.linking or not len(ring.ids):
        return Found(found, out, linked)
    cross = scan(ring.bank, codes, watch.query_k, len(ring.bank), watch.global_threshold,
                 watch.global_view_threshold, within=False, skip=ring.clients == client)
    for i in range(len(codes)):
        if cross.found[i]:
            found[i] = True
            linked[i] = tuple(sorted(set(ring.clients[cross.near[i]].tolist())))
        if out[i] is None and cross.match[i] >= 0:
            out[i] = ring.answers[cross.match[i]]
    return Found(found, out, linked)


__all__ = ["ENCODING", "Bank", "Found", "QueryWatch", "Ring", "Scan", "calibrate", "detect",
           "encode", "mean_knn", "own", "repeats", "scan", "split", "stack_history"]
