"""Client state on a Redis server, shared by every replica of the service, with the semantics of
:class:`~advguard.serve.stores.SQLiteStore`: each admission is one optimistic transaction
(``WATCH`` the client's keys, read, decide with :func:`~advguard.serve.state.admit`, then
``MULTI``/``EXEC``; retried when another replica changed the client in between), so two
replicas never both answer past a denial.

Keys (prefix ``advguard``): ``record:C`` (client ``C``'s :class:`~advguard.serve.state.Record`
as JSON: totals, denial, share window, evidence), ``queries:C`` (list, newest first:
``time:code:answer`` with the code in base64; expires ``ttl_s`` after the last query),
``sent:C`` (how many queries C has pushed onto that list; expires with it), ``clients``
(set of every client), ``ring`` (stream: the global index of every client's newest queries,
capped at ``query_global`` entries) and ``ring-generation`` (changed when a clear deletes from
the ring).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np

from advguard.errors import StateError
from advguard.serve import state
from advguard.serve.matching import Bank, Cached, Found, History, Ring, detect
from advguard.serve.policy import Admission, CheckedStore, ClientStatus, Policy, reporting
from advguard.serve.queries import DIMS, QueryWatch


class RedisStore(CheckedStore):
    """Client state on a Redis server (``redis://host:port/db``), shared by every replica."""

    kind = "redis"

    def __init__(self, url: str, policy: Policy, watch: QueryWatch | None = None,
                 prefix: str = "advguard") -> None:
        import redis

        self.policy = policy
        self.watch = watch
        self.prefix = prefix
        parsed = urlparse(url)  # named without its password
        self.where = f"Redis at {parsed.hostname or parsed.path}:{parsed.port or 6379}"
        self.backend_errors = (redis.RedisError,)
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                          socket_connect_timeout=5)
        self._ring = Ring(watch.query_global) if watch is not None and watch.linking else None
        # client -> (its sent count when read, its history prepared for comparison)
        self._histories = Cached()
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StateError(f"cannot reach {self.where}: {exc}") from None

    def _key(self, name: str, client: str = "") -> str:
        return f"{self.prefix}:{name}:{client}" if client else f"{self.prefix}:{name}"

    def _history(self, r: Any, client: str, now: float) -> list[tuple[bytes, str]]:
        """The client's query history, oldest first: raw float16 codes and the answers they
        were given (``r``: the connection or a watching pipeline)."""
        if self.watch is None:
            return []
        ttl = self.watch.query_ttl_s
        return [(base64.b64decode(c), a) for t, c, a in
                (h.split(":", 2) for h in reversed(r.lrange(self._key("queries", client), 0, -1)))
                if float(t) > now - ttl]

    def _prepared(self, pipe: Any, client: str, now: float, dims: int) -> tuple[int, History]:
        """``(sent, history)``: the client's history prepared for comparison, as of ``sent``
        queries pushed. Only the entries pushed since this replica's copy are read (the list
        is newest first, so they are its head), once the copy's newest entry is found where it
        should be; a copy that does not fit what Redis holds (a clear, an expiry) is read
        whole. Entries of other replicas are committed: the copy may
        take them in whether or not this admission's transaction commits."""
        assert self.watch is not None
        queries = self._key("queries", client)
        sent, length = int(pipe.get(self._key("sent", client)) or 0), int(pipe.llen(queries))
        cached = self._histories.get(client)
        if cached is not None and cached[0] <= sent and sent - cached[0] < length and len(
                cached[1]) and _same(pipe.lindex(queries, sent - cached[0]), cached[1]):
            h = cached[1]
            new = pipe.lrange(queries, 0, sent - cached[0] - 1) if sent > cached[0] else []
            h.extend(_rows(reversed(new), sent), dims)
        else:
            h = History.of(_rows(reversed(pipe.lrange(queries, 0, -1)), sent), dims)
        h.keep_newest(length, h.times > now - self.watch.query_ttl_s)
        self._histories.put(client, (sent, h))
        return sent, h

    @reporting
    def _admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               queries: Bank | None, now: float, answers: list[str]) -> Admission:
        p, w = self.policy, self.watch
        codes = None if queries is None else queries.raw
        key, stored, sent_key = (self._key(k, client) for k in ("record", "queries", "sent"))
        # the global index is read before the transaction: a query is compared with the other
        # keys' queries as they stood a moment before (not watched: every admission would
        # conflict with every other)
        ring = self._read_ring(now, codes.shape[1]) if codes is not None else None
        out: list[Admission] = []
        pushed: list[tuple[int, list[str]]] = []  # (sent before, answers) once committed

        def attempt(pipe: Any) -> None:
            out.clear()
            pushed.clear()
            record = state.Record.from_json(pipe.get(key))
            expired = record.expired(now)
            sent, history = 0, History(DIMS if codes is None else codes.shape[1])
            if not expired and w is not None:
                sent, history = self._prepared(pipe, client, now, history.dims)
            none = np.zeros(len(flagged), dtype=bool)
            if record.denied(now):
                status = state.status(client, record, len(history), now, p)
                out.append(Admission(False, status, none))
                return
            found = Found(none, [None] * len(flagged), [() for _ in flagged])
            if queries is not None and w is not None:
                found = detect(history.bank, list(history.answers), queries, answers, w, ring,
                               client)
            seen = state.watched(found, answers, p.flag_beside)
            step = state.admit(record, flagged, scores, seen.repeats, list(seen.links), now, p,
                               seen.flips, seen.as_before)
            others = {}
            for other, (n, f) in seen.links.items():  # they count on the linked keys too
                pipe.watch(self._key("record", other))
                others[other] = state.attribute(
                    state.Record.from_json(pipe.get(self._key("record", other))), client, n,
                    now, p, f)
            pipe.multi()
            pipe.sadd(self._key("clients"), client)
            if expired:  # its cool-down ended: start afresh
                pipe.delete(stored, sent_key)
                self._histories.pop(client, None)
            pipe.set(key, step.record.to_json())
            for other, rec in others.items():
                pipe.set(self._key("record", other), rec.to_json())
            n_queries = len(history)
            if codes is not None and w is not None:
                given = seen.kept
                pipe.lpush(stored, *(f"{now!r}:{base64.b64encode(c.tobytes()).decode()}:{a}"
                                      for c, a in zip(codes, given, strict=True)))
                pipe.ltrim(stored, 0, w.query_history - 1)
                pipe.expire(stored, math.ceil(w.query_ttl_s))
                pipe.incrby(sent_key, len(codes))
                pipe.expire(sent_key, math.ceil(w.query_ttl_s))
                n_queries = min(w.query_history, n_queries + len(codes))
                pushed.append((0 if expired else sent, given))
                if ring is not None:
                    for c, a in zip(codes, given, strict=True):
                        pipe.xadd(self._key("ring"), {"c": client, "t": repr(now),
                                                      "q": base64.b64encode(c.tobytes()),
                                                      "a": a},
                                  maxlen=w.query_global, approximate=False)
            status = state.status(client, step.record, n_queries, now, p)
            out.append(Admission(step.answered, status, found.detections, step.denied_now,
                                 seen.told, seen.as_before))

        self.redis.transaction(attempt, key, stored, sent_key)
        if pushed and queries is not None and w is not None:  # committed: the copy takes them in
            before, given = pushed[-1]
            cached = self._histories.get(client)
            if cached is not None and cached[0] == before:
                cached[1].add(np.arange(before + 1, before + 1 + len(queries)),
                              np.full(len(queries), now), queries, given)
                cached[1].keep_newest(w.query_history)
                self._histories[client] = (before + len(queries), cached[1])
            else:
                self._histories.pop(client, None)
        return out[0]

    def _read_ring(self, now: float, dims: int) -> Ring | None:
        """This process's copy of the global index (a Redis stream of the newest
        ``query_global`` queries), brought up to date: only entries added since its last read,
        unless a clear changed the generation."""
        ring, w = self._ring, self.watch
        if ring is None or w is None:
            return None
        r: Any = self.redis  # decode_responses: strings
        generation = r.get(self._key("ring-generation")) or ""
        if generation != ring.generation:
            ring.reset(generation)
        start = "-" if not ring.last_id else f"({_stream_id(ring.last_id)}"
        entries = r.xrange(self._key("ring"), start, "+")
        ring.extend([(_id_number(i), f["c"], float(f["t"]), base64.b64decode(f["q"]), f["a"])
                     for i, f in entries], dims)
        ring.trim(now, w.query_ttl_s)
        return ring

    @reporting
    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        raw: Any = self.redis.get(self._key("record", client))
        if raw is None:
            return ClientStatus.empty(client)
        record = state.Record.from_json(raw)
        history = [] if record.expired(now) else self._history(self.redis, client, now)
        return state.status(client, record, len(history), now, self.policy)

    @reporting
    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names: set[str] = self.redis.smembers(self._key("clients"))  # type: ignore[assignment]
        return [self.get(c, now) for c in sorted(names)]

    @reporting
    def clear(self, client: str) -> ClientStatus:
        key = self._key("record", client)
        entries: Any = self.redis.xrange(self._key("ring"), "-", "+")
        ring = [i for i, f in entries if f["c"] == client]

        def attempt(pipe: Any) -> None:
            record = state.Record.from_json(pipe.get(key))
            pipe.multi()
            if record != state.Record():
                pipe.set(key, record.afresh().to_json())
            pipe.delete(self._key("queries", client), self._key("sent", client))
            if ring:
                pipe.xdel(self._key("ring"), *ring)
                pipe.incr(self._key("ring-generation"))

        self.redis.transaction(attempt, key)
        self._histories.pop(client, None)
        return self.get(client)

    @reporting
    def probe(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()


def _same(entry: str | None, h: History) -> bool:
    """Whether a stored entry is the newest query of ``h`` (its time and answer)."""
    if entry is None:
        return False
    t, _, answer = entry.split(":", 2)
    return float(t) == float(h.times[-1]) and answer == h.answers[-1]


def _rows(entries: Any, last: int) -> list[tuple[int, float, bytes, str]]:
    """Stored ``time:code:answer`` entries, oldest first, as History rows ``(id, time, code,
    answer)``: ids count the client's pushes, the newest being ``last``."""
    parts = [e.split(":", 2) for e in entries]
    first = last - len(parts) + 1
    return [(first + i, float(t), base64.b64decode(c), a) for i, (t, c, a) in enumerate(parts)]


def _stream_id(number: int) -> str:
    """A Redis stream id (``ms-seq``) from :func:`_id_number`'s integer."""
    return f"{number // 1_000_000}-{number % 1_000_000}"


def _id_number(stream_id: str) -> int:
    """A Redis stream id as one increasing integer (the ring's ids)."""
    ms, seq = stream_id.split("-")
    return int(ms) * 1_000_000 + int(seq)
