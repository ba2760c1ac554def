"""How the query watch compares a request's queries with what came before (the encoding and
the calibration are :mod:`advguard.serve.queries`): codes prepared for comparison
(:class:`Bank`), the scan against a client's history and the request itself (:func:`scan`), the
account-oblivious index of every client's newest queries (:class:`Ring`), and the findings a
store acts on — detections, the earlier answers near-copies are given, the keys they link
(:func:`detect`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advguard.errors import InputError
from advguard.serve.queries import DIMS, QueryWatch, split

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
    # a lone query is compared with the bank alone (nothing earlier in its request): no copy
    seen = bank + q if within and len(q) > 1 else bank
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


@dataclass(frozen=True)
class History:
    """One client's stored queries as a store's process last read them (id order): ids, times,
    the codes prepared for comparison and the answers they were given."""

    ids: np.ndarray  # (n,) int64
    times: np.ndarray  # (n,) float64
    bank: Bank  # (n,) codes, prepared for comparison
    answers: np.ndarray  # (n,) object: the answer each query was given (JSON)

    @classmethod
    def of(cls, rows: Sequence[tuple[int, float, bytes, str]], dims: int) -> History:
        rows = [r for r in rows if len(r[2]) == 2 * dims]  # codes of this encoding only
        return cls(np.array([r[0] for r in rows], dtype=np.int64),
                   np.array([r[1] for r in rows], dtype=np.float64),
                   Bank.of(np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float16)
                           .reshape(-1, dims)), np.array([r[3] for r in rows], dtype=object))

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: History) -> History:
        return History(np.concatenate([self.ids, other.ids]),
                       np.concatenate([self.times, other.times]), self.bank + other.bank,
                       np.concatenate([self.answers, other.answers]))

    def __getitem__(self, keep: slice | np.ndarray) -> History:
        return History(self.ids[keep], self.times[keep], self.bank[keep], self.answers[keep])


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


__all__ = ["Bank", "Found", "History", "Ring", "Scan", "detect", "own", "repeats", "scan"]
