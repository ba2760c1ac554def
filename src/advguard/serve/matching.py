"""How the query watch compares a request's queries with what came before (the encoding and
the calibration are :mod:`advguard.serve.queries`): codes prepared for comparison
(:class:`Bank`), the scan against a client's history and the request itself (:func:`scan`), the
account-oblivious index of every client's newest queries (:class:`Ring`), and the findings a
store acts on — detections, the earlier answers near-copies are given, the keys they link
(:func:`detect`)."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advguard.errors import InputError
from advguard.serve.queries import DIMS, SHIFT, QueryWatch, axis_moves, split, view_grid, view_moves

# pixel-view values whose maximum is one number of the cheap L∞ bound (a chunk's maximum moves
# by at most the L∞ distance, as its mean does). On 200 × 2,800 validation digits (MNIST
# training images 55,000 on) at view thresholds 0.6 / 0.79, maxima of 8 let 0.04% / 0.12% of
# pairs through to the exact distance, means of 4 (twice the numbers) 0.7% / 3.7%; on CIFAR-10
# at 0.064 / 0.32, 0.00% / 0.45% against 0.00% / 0.14%. Half the numbers read per query: the
# index's scan is bound by memory, not arithmetic.
CHUNK = 8
ALIGN_BLOCK = 256  # rows whose bound is taken for a group of moves at once (≈ 1 MB on MNIST)
# the newest rows a query is aligned with by moves, of its client's history and of the other
# clients' queries in the global index (older ones are compared unmoved): a moved attack's or
# a camera's near-copies are recent queries; aligning with all
# 1,000 cost 2.3 ms a query against 0.4 ms for 128 (MNIST, one thread), and the load
# benchmark's service lost 9% of its requests a second to the alignment over histories of 250
# (both measured with the 25 shifts alone; with the crops' 169 moves a scan against 1,000
# takes 0.77 ms, and the crops cost about 7% more of the load benchmark's requests a second)
ALIGN_ROWS = 128


@dataclass(frozen=True)
class Bank:
    """Codes prepared for comparison: the raw float16 rows (to tell the very same image), the
    projection, its squared norms, the pixel view and its chunk maxima (the largest gap between
    two views' maxima over ``CHUNK`` values never exceeds their L∞ distance: a cheap bound
    that rules most pairs out before the exact distance is taken)."""

    raw: np.ndarray  # (n, D) float16
    proj: np.ndarray  # (n, DIMS) float32
    norms: np.ndarray  # (n,) float32
    view: np.ndarray | None  # (n, V) float32
    chunks: np.ndarray | None  # (n, V // CHUNK) float32: maxima
    # (n, I // CHUNK) float32: the chunk maxima of each view's interior (SHIFT cells in from
    # every side), the same bound for queries aligned by moves (None: a view not a square)
    inner: np.ndarray | None = None
    # a request's queries only (:func:`prepare`): each one's interior moved each way, (n,
    # moves, I), unmoved first (``queries.moves``), and those windows' chunk maxima
    moved: np.ndarray | None = None
    moved_maxima: np.ndarray | None = None
    # and the middle and half-width of the range of those maxima over each group of moves
    # (:func:`_groups`), (n, groups, I // CHUNK) each: the bounds :meth:`aligned` takes first
    moved_mid: np.ndarray | None = None
    moved_half: np.ndarray | None = None

    @classmethod
    def of(cls, codes: np.ndarray | Bank) -> Bank:
        """Codes prepared for comparison (a bank is its own)."""
        if isinstance(codes, Bank):
            return codes
        raw = np.asarray(codes, dtype=np.float16)
        proj, view = split(raw)
        chunks = inner = None
        if view is not None and view.shape[1] >= 4 * CHUNK:
            chunks = _maxima(view)
            interior = _interior(view)
            inner = None if interior is None else _maxima(interior)
        return cls(raw, proj, (proj * proj).sum(1), view, chunks, inner)

    def __len__(self) -> int:
        return len(self.raw)

    def __add__(self, other: Bank) -> Bank:
        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return Bank(np.concatenate([self.raw, other.raw]), np.concatenate([self.proj, other.proj]),
                    np.concatenate([self.norms, other.norms]), cat(self.view, other.view),
                    cat(self.chunks, other.chunks), cat(self.inner, other.inner))

    def __getitem__(self, keep: slice | np.ndarray) -> Bank:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return Bank(self.raw[keep], self.proj[keep], self.norms[keep], pick(self.view),
                    pick(self.chunks), pick(self.inner), pick(self.moved),
                    pick(self.moved_maxima), pick(self.moved_mid), pick(self.moved_half))

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
        if self.chunks is not None and q.chunks is not None and len(rows):
            lo = int(rows.min())  # the bound over a contiguous span: no copy of the rows
            gap = self.chunks[lo:int(rows.max()) + 1] - q.chunks[i]
            near = np.flatnonzero(_largest(gap)[rows - lo] <= below)
        if len(near):
            out[near] = _largest(self.view[rows[near]] - q.view[i])
        return out

    def aligned(self, q: Bank, i: int, rows: np.ndarray, below: float, most: int,
                windows: np.ndarray | None = None, crop: int = 0) -> np.ndarray:
        """The L∞ distances in the pixel view from query ``i`` of ``q``, aligned by the move
        that brings it nearest — a shift of up to ``most`` pixels, a crop of up to ``crop``
        pixels a side resized back, each axis (``queries.axis_moves``) — to ``rows`` of this
        bank: over each row's interior (``SHIFT`` cells in from every side, which every such
        move keeps inside the query), exact where they can be below ``below`` (the rest
        ``inf``). ``windows``: the query's interior moved each way (``queries.moves``, for a
        pooled view, whose cells are more than a pixel); by default taken from its view, whose
        cells are its pixels, or prepared with the query (:func:`prepare`). A query an
        attacker moved or cropped, or a jittering camera's frame, is as near its earlier ones
        as unmoved; the unmoved interior is one of the moves, so no row is farther than
        :meth:`linf` says."""
        assert self.view is not None and self.inner is not None and q.view is not None
        out = np.full(len(rows), np.inf, dtype=np.float32)
        if not len(rows):
            return out
        if (windows is None and q.moved is not None and q.moved_maxima is not None
                and q.moved_mid is not None and q.moved_half is not None):
            windows, maxima = q.moved[i], q.moved_maxima[i]
            mid, half = q.moved_mid[i], q.moved_half[i]
        else:
            if windows is None:  # (moves, I): the query's interior, moved
                windows = view_moves(q.view[i][None], most, crop)[0]
            maxima = _maxima(windows)
            mid, half = (a[0] for a in _groups(maxima[None]))
        # first one bound for every move at once: a row whose chunk maximum lies above the
        # largest of the moves' (or below the smallest) by more than ``below`` is that far
        # from every move (each move's bound is at least this one); most rows end here
        inner = self.inner[rows]
        top, bottom = (mid + half).max(0), (mid - half).min(0)
        left = np.flatnonzero(_outside(inner, (top + bottom) / 2, (top - bottom) / 2)
                              <= below)  # positions in ``rows`` still in question
        if not len(left):
            return out
        # then the same for each group of moves on the rows left: one envelope over 169 moves
        # (crops) lets many of MNIST's digits through (their empty chunks), a group's far fewer
        size = _group_size(len(maxima))
        starts = np.arange(0, len(maxima), size)
        through = (_outside(inner[left][None], mid[:, None], half[:, None])
                   <= below)  # (groups, rows left)
        shift, near = [], []  # the (move, row) pairs the bounds let through
        for group in np.flatnonzero(through.any(1)):
            first = int(starts[group])
            group_left = left[through[group]]
            group_maxima = maxima[first:first + size]
            for start in range(0, len(group_left), ALIGN_BLOCK):  # a block of rows at a time
                block = group_left[start:start + ALIGN_BLOCK]
                gap = inner[block][None] - group_maxima[:, None]  # (moves, rows, chunks)
                s, r = np.nonzero(_largest(gap.reshape(-1, gap.shape[-1]))
                                  .reshape(gap.shape[:2]) <= below)
                shift.append(first + s)
                near.append(block[r])
        if not shift:
            return out
        s, r = np.concatenate(shift), np.concatenate(near)
        if len(r):
            interior = _interior(self.view[rows[r]])
            assert interior is not None
            np.minimum.at(out, r, _largest(interior - windows[s]))
        return out


def _maxima(view: np.ndarray) -> np.ndarray:
    """The maxima of each row's consecutive ``CHUNK`` values (a trailing part left out): a
    running maximum over the chunk's positions (``max`` over an axis of 8 took ten times as
    long on a query's 169 moved windows)."""
    g = view.shape[1] // CHUNK * CHUNK
    chunks = view[:, :g].reshape(len(view), g // CHUNK, CHUNK)
    out = chunks[..., 0].copy()
    for k in range(1, CHUNK):
        np.maximum(out, chunks[..., k], out=out)
    return out


def _group_size(moves: int) -> int:
    """Consecutive moves bounded together (√moves: 13 of 169, 5 of 25)."""
    return max(1, math.isqrt(moves))


def _groups(maxima: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The range of the chunk maxima ``(n, moves, C)`` over each group of :func:`_group_size`
    consecutive moves, as its middle and half-width: ``(n, groups, C)`` each. The moves are
    one axis's by the other's (a square count: ``queries.moves``), so the groups are the rows
    of that square (a reshape; ``reduceat`` over the moves' axis took three times as long)."""
    n, count, chunks = maxima.shape
    size = _group_size(count)
    if size * size != count:
        raise InputError(f"{count} moves a query are not one axis's moves by the other's")
    square = maxima.reshape(n, size, size, chunks)
    hi, lo = square.max(2), square.min(2)
    return (hi + lo) / 2, (hi - lo) / 2


def _outside(maxima: np.ndarray, mid: np.ndarray, half: np.ndarray) -> np.ndarray:
    """How far rows' chunk maxima (``(..., C)``) lie outside the range ``mid ± half`` at the
    farthest chunk (≤ 0: inside it everywhere) — max(x − hi, lo − x) as |x − mid| − half, one
    temporary where the two sides took three (the alignment's costliest line)."""
    d = maxima - mid
    np.abs(d, out=d)
    d -= half
    return d.max(-1)


def _interior(view: np.ndarray) -> np.ndarray | None:
    """Pixel views' interiors, ``SHIFT`` cells in from every side, flattened (None for views
    that are not a square grid, or too small to have one)."""
    grid = view_grid(view.shape[1])
    if grid is None or grid[1] <= 2 * SHIFT + 2:
        return None
    c, h, w = grid
    return view.reshape(len(view), c, h, w)[:, :, SHIFT:h - SHIFT, SHIFT:w - SHIFT].reshape(
        len(view), c * (h - 2 * SHIFT) * (w - 2 * SHIFT))


def prepare(codes: np.ndarray | Bank, shift: int = 0,
            moved: np.ndarray | None = None, crop: int = 0) -> Bank:
    """A request's ``codes`` prepared for the scan before its admission (the service does it
    on the inference thread, a batch at a time, so the admissions — one at a time, under the
    store's lock — do not): a :class:`Bank` and, where queries are aligned by moves (shifts of
    up to ``shift`` pixels, crops of up to ``crop``), each query's moved windows (``moved``,
    from ``queries.moves`` for pooled views; else taken from the view) and their chunk
    maxima."""
    bank = Bank.of(codes)
    if not (shift or crop) or bank.inner is None or bank.view is None or bank.moved is not None:
        return bank
    windows = (view_moves(bank.view, shift, crop) if moved is None
               else np.asarray(moved, np.float32))
    expected = len(axis_moves(shift, crop)) ** 2
    if windows.shape[1] != expected:
        raise InputError(f"{windows.shape[1]} moved windows a query for shifts of {shift} and "
                         f"crops of {crop} ({expected} moves): compute them with the same "
                         "watch (QueryWatch.windows)")
    n, m, size = windows.shape
    maxima = _maxima(windows.reshape(n * m, size)).reshape(n, m, -1)
    mid, half = _groups(maxima)
    return dataclasses.replace(bank, moved=windows, moved_maxima=maxima, moved_mid=mid,
                               moved_half=half)


def _largest(diff: np.ndarray) -> np.ndarray:
    """Each row's largest absolute value, taken in place (``diff`` is a temporary): a second
    array of the bank's size per query was a third of an admission's time."""
    np.abs(diff, out=diff)
    return diff.max(1)


@dataclass(frozen=True)
class Scan:
    """What the watch finds of a request's queries against what it is compared with."""

    found: np.ndarray  # (n,) bool: attack-process detections
    # (n,) int: the row each query is answered as (a near-copy, or the very same image
    # again), in the order compared — the bank, then the request's earlier queries; -1: a
    # fresh answer
    match: np.ndarray
    near: list[np.ndarray]  # per query, the rows of its nearest (those that detected it)
    # per query not detected, the rows inside its pixel view's ball (fewer than view_k): the
    # earlier queries it lies beside, whose classes say whether it flipped one
    ball: list[np.ndarray]

    def around(self, i: int) -> np.ndarray:
        """The earlier rows inside query ``i``'s ball whose classes say whether it flipped one:
        those that detected it, else those it lies beside."""
        return self.near[i] if self.found[i] else self.ball[i]


def scan(bank: Bank, codes: np.ndarray | Bank, k: int, window: int, threshold: float | None,
         view_threshold: float | None, *, within: bool = True,
         skip: np.ndarray | None = None, view_k: int | None = None, shift: int = 0,
         moved: np.ndarray | None = None, crop: int = 0) -> Scan:
    """Each of ``codes`` compared with the ``bank`` (and, ``within``, with the request's
    earlier codes: a batch of near-copies detects itself), the newest ``window`` of them, less
    the rows ``skip`` marks: a detection when the mean L2 distance of its projection to its
    ``k`` nearest is below ``threshold`` or when ``view_k`` (default ``k``) of them lie within
    ``view_threshold`` of
    it in L∞ in the pixel view (the ε-ball every query of one attack stays in, blinding noise
    included; with ``shift`` or ``crop``, after aligning it by shifts of up to ``shift`` pixels
    and crops of up to ``crop`` with the newest ``ALIGN_ROWS`` of them: :meth:`Bank.aligned`,
    with ``moved`` the codes' moved windows where their views are pooled).
    A detection is answered as its nearest (in the view that detected it); the very
    same image sent again is answered as it was and is no detection (it tells nothing new).
    A query that is neither keeps the rows inside its ball (``Scan.ball``, fewer than
    ``view_k``, aligned as for a detection)."""
    q = Bank.of(codes)  # prepared already where the service admits a request
    n = len(bank)
    # a lone query is compared with the bank alone (nothing earlier in its request): no copy
    seen = bank + q if within and len(q) > 1 else bank
    use_view = view_threshold is not None and seen.view is not None and q.view is not None
    # the projection's distances only where its threshold decides (a watch calibrated for an
    # ε ball has none: the view decides, and the index is read once per query)
    d = seen.l2(q) if threshold is not None else None
    allowed = np.ones(len(seen), dtype=bool)
    if skip is not None:
        allowed[:n][skip] = False
    found = np.zeros(len(codes), dtype=bool)
    match = np.full(len(codes), -1)
    near: list[np.ndarray] = [np.zeros(0, dtype=int) for _ in range(len(codes))]
    ball = list(near)
    kv = k if view_k is None else view_k
    for i in range(len(codes)):
        hi = n + i if within else n
        lo = max(0, hi - window)  # what code i is compared with
        rows = lo + np.flatnonzero(allowed[lo:hi])
        # the very same image again: its projection's norm is the same to the bit
        close = rows[seen.norms[rows] == q.norms[i]]
        same = close[(seen.raw[close].view(np.uint16) == q.raw[i].view(np.uint16)).all(1)]
        if len(same):  # sent before: answered as it was, and tells nothing new
            match[i] = same[-1]
            continue
        if use_view and len(rows):
            assert view_threshold is not None
            dv = seen.linf(q, i, rows, view_threshold)
            if _kth(dv, kv) >= view_threshold and (shift or crop) and seen.inner is not None:
                recent = rows[-ALIGN_ROWS:]  # moved: aligned with the newest, first
                dv[-len(recent):] = np.minimum(dv[-len(recent):], seen.aligned(
                    q, i, recent, view_threshold, shift, None if moved is None else moved[i],
                    crop))
            if _kth(dv, kv) < view_threshold:
                inside = np.argpartition(dv, kv - 1)[:kv]
                found[i], match[i], near[i] = True, rows[int(np.argmin(dv))], rows[inside]
                continue
            ball[i] = rows[dv < view_threshold]
        if d is None or len(rows) < k:
            continue  # no projection threshold, or too few to compare with
        nearest = np.argpartition(d[i, rows], k - 1)[:k]
        if threshold is not None and d[i, rows[nearest]].mean() < threshold:
            found[i], match[i], near[i] = True, rows[int(np.argmin(d[i, rows]))], rows[nearest]
            ball[i] = near[i][:0]
    return Scan(found, match, near, ball)


def _kth(d: np.ndarray, k: int) -> float:
    """The ``k``-th smallest of ``d`` (inf where it holds fewer)."""
    return float(np.partition(d, k - 1)[k - 1]) if len(d) >= k else np.inf


def repeats(history: np.ndarray | Bank, codes: np.ndarray | Bank, watch: QueryWatch) -> np.ndarray:
    """Which of a request's ``codes`` are attack-process detections against the client's
    history and the request's earlier codes (:func:`scan` with the per-client thresholds)."""
    return own(history, codes, watch).found


def own(history: np.ndarray | Bank, codes: np.ndarray | Bank, watch: QueryWatch,
        moved: np.ndarray | None = None) -> Scan:
    """:func:`scan` of a request's ``codes`` against its client's history (codes, or a bank
    prepared from them); ``moved``: the codes' moved windows (``queries.moves``)."""
    if watch.threshold is None and watch.view_threshold is None:
        raise InputError("the query watch has no threshold: calibrate it first")
    codes = Bank.of(codes)
    if not isinstance(history, Bank):
        history = Bank.of(np.asarray(history, dtype=np.float16).reshape(-1,
                                                                        codes.raw.shape[1]))
    return scan(history, codes, watch.query_k, watch.query_history, watch.threshold,
                watch.view_threshold, view_k=watch.view_k, shift=watch.shift, moved=moved,
                crop=watch.crop)


class Rows:
    """Named columns of rows appended at the end and dropped from the front without copying
    the rows that stay: each column is over-allocated by a quarter, and the live rows move to
    a fresh buffer only when it is full (amortised cost per admission: a few times the rows
    added, where concatenating cost every row held — 40 MB a request for a 5,000-query
    index)."""

    def __init__(self) -> None:
        self._cols: dict[str, np.ndarray] = {}
        self._lo = self._hi = 0

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def nbytes(self) -> int:
        """Bytes the columns hold allocated, spare rows included (object columns: their
        pointers only)."""
        return sum(c.nbytes for c in self._cols.values())

    def get(self, name: str) -> np.ndarray | None:
        """The live rows of column ``name`` (a view, not a copy), None if it has none."""
        col = self._cols.get(name)
        return None if col is None else col[self._lo:self._hi]

    def append(self, **new: np.ndarray | None) -> None:
        """Add rows to every column (each given with the same number of rows; a column given
        as None is dropped: codes without a pixel view have none)."""
        cols = {k: v for k, v in new.items() if v is not None}
        n = len(next(iter(cols.values())))
        if not n:
            return
        full = not self._cols or self._hi + n > len(next(iter(self._cols.values())))
        if full or set(cols) != set(self._cols):  # a quarter spare: ≤ 1.25× the rows held
            live = len(self) + n
            self._move(live + max(64, live // 4), cols)
        for k, v in cols.items():
            self._cols[k][self._hi:self._hi + n] = v
        self._hi += n

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows ``mask`` marks: dropping a prefix only moves the start."""
        mask = np.asarray(mask, dtype=bool)
        first = int(np.argmax(mask)) if mask.any() else len(mask)
        if mask[first:].all():
            self._lo += first
            return
        self._cols = {k: self.get(k)[mask] for k in self._cols}  # type: ignore[index]
        self._lo, self._hi = 0, int(mask.sum())

    def _move(self, capacity: int, like: dict[str, np.ndarray]) -> None:
        live = len(self)
        cols = {}
        for k, v in like.items():
            cols[k] = np.empty((capacity, *v.shape[1:]), dtype=v.dtype)
            old = self.get(k)
            if old is not None and live:
                cols[k][:live] = old
        self._cols, self._lo, self._hi = cols, 0, live


def bank_of(rows: Rows, dims: int) -> Bank:
    """The codes a :class:`Rows` holds, as a bank (views of its columns, nothing copied; an
    empty bank of codes of ``dims`` numbers when it holds none)."""
    raw, proj, norms = rows.get("raw"), rows.get("proj"), rows.get("norms")
    if raw is None or proj is None or norms is None or not len(rows):
        return Bank.of(np.zeros((0, dims)))
    return Bank(raw, proj, norms, rows.get("view"), rows.get("chunks"), rows.get("inner"))


def bank_columns(bank: Bank) -> dict[str, np.ndarray | None]:
    return {"raw": bank.raw, "proj": bank.proj, "norms": bank.norms, "view": bank.view,
            "chunks": bank.chunks, "inner": bank.inner}


class Stored:
    """Stored queries as a store's process holds them (id order): their ids, times, codes
    prepared for comparison and answers, kept in :class:`Rows`."""

    def __init__(self, dims: int) -> None:
        self.rows = Rows()
        self.dims = dims

    @property
    def ids(self) -> np.ndarray:
        return _column(self.rows, "ids", np.int64)

    @property
    def times(self) -> np.ndarray:
        return _column(self.rows, "times", np.float64)

    @property
    def answers(self) -> np.ndarray:
        return _column(self.rows, "answers", object)

    @property
    def bank(self) -> Bank:
        return bank_of(self.rows, self.dims)

    def __len__(self) -> int:
        return len(self.rows)

    def keep_newest(self, n: int, also: np.ndarray | None = None) -> None:
        """Keep the newest ``n`` rows (and, with ``also``, only those it marks)."""
        keep = np.arange(len(self)) >= len(self) - n
        self.rows.keep(keep if also is None else keep & also)


# clients whose query history a store's process keeps read: a full history of 1,000 MNIST
# queries takes 8.7 MB prepared for comparison (room for a quarter more rows included; 0.36 MB
# of it the interior maxima the alignment reads), so at most about 1.1 GB for 128
CACHED_CLIENTS = 128


class Cached(OrderedDict[str, Any]):
    """A store process's copies of its most recent clients' histories: the newest
    ``CACHED_CLIENTS`` kept, the least recently used dropped."""

    def put(self, client: str, value: Any) -> None:
        self[client] = value
        self.move_to_end(client)
        if len(self) > CACHED_CLIENTS:
            self.popitem(last=False)


def _column(rows: Rows, name: str, dtype: Any) -> np.ndarray:
    col = rows.get(name)
    return np.zeros(0, dtype=dtype) if col is None else col


class History(Stored):
    """One client's stored queries as a store's process last read them (id order): ids, times,
    the codes prepared for comparison and the answers they were given; rows are added and
    dropped in place (:class:`Rows`)."""

    @classmethod
    def of(cls, rows: Sequence[tuple[int, float, bytes, str]], dims: int) -> History:
        h = cls(dims)
        h.extend(rows, dims)
        return h

    def extend(self, rows: Sequence[tuple[int, float, bytes, str]], dims: int) -> None:
        """Add stored rows ``(id, time, code bytes, answer)`` (codes of another length, from
        another encoding, are left out)."""
        rows = [r for r in rows if len(r[2]) == 2 * dims]
        if rows:
            self.add(np.array([r[0] for r in rows], dtype=np.int64),
                     np.array([r[1] for r in rows], dtype=np.float64),
                     np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float16)
                     .reshape(-1, dims), [r[3] for r in rows])

    def add(self, ids: np.ndarray, times: np.ndarray, codes: np.ndarray | Bank,
            answers: Sequence[str]) -> None:
        self.rows.append(ids=ids, times=times, answers=np.array(answers, dtype=object),
                         **bank_columns(Bank.of(codes)))

    def keep(self, mask: np.ndarray) -> None:
        self.rows.keep(mask)


class Ring(Stored):
    """The account-oblivious index: the newest ``size`` queries of every client (Li et al.
    2022, "Blacklight": one store over all accounts, so spreading an attack over many keys does
    not hide it), with the answer each was given, as a store's process holds them. Rows come
    from the store in id order and leave by a rule every process applies alike (the newest
    ``size``, younger than the TTL), so a process reads only the rows added since its last
    read; ``generation`` changes when rows are deleted otherwise (an admin's clear), and a
    process that sees it change reads the index whole."""

    def __init__(self, size: int) -> None:
        super().__init__(DIMS)
        self.size = size
        self.generation = ""

    @property
    def clients(self) -> np.ndarray:
        return _column(self.rows, "clients", object)

    @property
    def last_id(self) -> int:
        ids = self.ids
        return int(ids[-1]) if len(ids) else 0

    def extend(self, rows: Sequence[tuple[int, str, float, bytes, str]], dims: int,
               bank: Bank | None = None) -> None:
        """Add rows ``(id, client, time, code bytes, answer)`` newer than the last one held, of
        codes of ``dims`` numbers (codes of another length, from another encoding, are left
        out); ``bank``: the rows' codes prepared already (a request's own, all new)."""
        if self.dims != dims:
            self.reset(self.generation, dims)
        last = self.last_id
        rows = [r for r in rows if len(r[3]) == 2 * dims and r[0] > last]
        if not rows:
            return
        if bank is None or len(bank) != len(rows):
            bank = Bank.of(np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float16)
                           .reshape(-1, dims))
        self.rows.append(ids=np.array([r[0] for r in rows], dtype=np.int64),
                         clients=np.array([r[1] for r in rows], dtype=object),
                         times=np.array([r[2] for r in rows], dtype=np.float64),
                         answers=np.array([r[4] for r in rows], dtype=object),
                         **bank_columns(bank))

    def trim(self, now: float, ttl_s: float) -> None:
        self.keep_newest(self.size, self.times > now - ttl_s)

    def reset(self, generation: str, dims: int = DIMS) -> None:
        """Forget every row (the store's index changed otherwise than by the rule)."""
        self.rows, self.dims, self.generation = Rows(), dims, generation


@dataclass(frozen=True)
class Found:
    """The watch's findings on one request: which queries are attack-process detections, the
    answer each query is to be given instead of a fresh one (a near-copy or a resend is
    answered as its nearest earlier query was; None: answered fresh), and the other clients
    each detection linked it to; for each query, the answers of the earlier queries inside
    its ball — those that detected it, or (too few for a detection) those it lies beside —
    whose classes say whether it flipped one."""

    detections: np.ndarray  # (n,) bool
    answers: list[str | None]
    linked: list[tuple[str, ...]]
    beside: list[tuple[str, ...]] = field(default_factory=list)  # empty: none beside any


def detect(history: np.ndarray | Bank, history_answers: Sequence[str],
           codes: np.ndarray | Bank,
           answers: Sequence[str], watch: QueryWatch, ring: Ring | None = None,
           client: str = "", moved: np.ndarray | None = None) -> Found:
    """The watch on a request's ``codes`` (with the ``answers`` fresh from the model): each is
    compared with the client's history (:func:`own`) and, with ``ring``, with the other
    clients' recent queries (the global index, its own thresholds; a detection there names
    the clients of the queries that detected it). A query the watch matches is answered as
    the query it matched was — the client's own first, else another client's — so a
    near-copy tells an attacker nothing the earlier answer did not. Each query keeps the
    answers of the earlier queries inside its ball, its client's and the index's
    (``Found.beside``): those that detected it, else those it lies beside."""
    codes = prepare(codes, watch.shift, moved, watch.crop)  # once, for both scans
    mine = own(history, codes, watch)
    given: list[str] = list(history_answers)
    out: list[str | None] = []
    beside: list[tuple[str, ...]] = []
    for i in range(len(codes)):  # in order: a request's near-copies answer as its earlier ones
        m = int(mine.match[i])
        out.append(None if m < 0 else given[m])
        beside.append(tuple(given[r] for r in mine.around(i)))
        given.append(out[-1] if out[-1] is not None else answers[i])
    found = mine.found.copy()
    linked: list[tuple[str, ...]] = [() for _ in range(len(codes))]
    if ring is None or not watch.linking or not len(ring.ids):
        return Found(found, out, linked, beside)
    # aligned by moves with the newest ``ALIGN_ROWS`` of the other clients' queries, as with
    # the client's own: an attack that moves its queries over many keys sends them in a run
    cross = scan(ring.bank, codes, watch.query_k, len(ring.bank), watch.global_threshold,
                 watch.global_view_threshold, within=False, skip=ring.clients == client,
                 view_k=watch.view_k, shift=watch.shift, crop=watch.crop)
    for i in range(len(codes)):
        if cross.found[i]:
            found[i] = True
            linked[i] = tuple(sorted(set(ring.clients[cross.near[i]].tolist())))
        if out[i] is None and cross.match[i] >= 0:
            out[i] = ring.answers[cross.match[i]]
        beside[i] = beside[i] + tuple(ring.answers[cross.around(i)])
    return Found(found, out, linked, beside)


__all__ = ["CACHED_CLIENTS", "Bank", "Cached", "Found", "History", "Ring", "Rows", "Scan",
           "Stored", "detect", "own", "prepare", "repeats", "scan"]
