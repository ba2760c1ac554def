"""Client state on a Redis server, shared by every replica of the service, with the semantics of
:class:`~advguard.serve.stores.SQLiteStore`: each admission is one optimistic transaction
(``WATCH`` the client's keys, read, decide with :func:`~advguard.serve.policy.judge`, then
``MULTI``/``EXEC``; retried when another replica changed the client in between), so two
replicas never both answer past a denial.

Keys of a client ``C`` (prefix ``advguard``): ``client:C`` (hash: totals and denial),
``verdicts:C`` (list, newest first: ``flagged:score``), ``evidence:C`` (sorted set by time:
flagged images and attack-process detections of a request), ``queries:C`` (list, newest first:
``time:code`` with the code in base64; expires ``ttl_s`` after the last query).
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
from advguard.serve.policy import (
    Admission,
    CheckedStore,
    ClientStatus,
    Evidence,
    Policy,
    judge,
    reporting,
)
from advguard.serve.queries import QueryWatch, repeats, stack_history


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
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StateError(f"cannot reach {self.where}: {exc}") from None

    def _keys(self, client: str) -> dict[str, str]:
        return {name: f"{self.prefix}:{name}:{client}"
                for name in ("client", "verdicts", "evidence", "queries")}

    def _all(self) -> str:
        return f"{self.prefix}:clients"

    def _read(self, r: Any, client: str, now: float
              ) -> tuple[ClientStatus, list[bytes], list[str], bool]:
        """The client's status, query history, share window (newest first), and whether a
        denial's cool-down has ended (``r``: the connection or a watching pipeline, in
        immediate mode); after a cool-down the client is read as starting afresh."""
        k = self._keys(client)
        info: dict[str, str] = r.hgetall(k["client"])
        until = info.get("denied_until")
        expired = until is not None and until != "inf" and now >= float(until)
        if expired:
            info = {key: v for key, v in info.items() if key not in ("denied_until", "reason")}
            items: list[str] = []
            evidence: list[str] = []
            history: list[str] = []
        else:
            items = r.lrange(k["verdicts"], 0, -1)
            evidence = r.zrangebyscore(k["evidence"], f"({now - self.policy.window_s!r}",
                                       "+inf")
            history = r.lrange(k["queries"], 0, -1) if self.watch is not None else []
        ttl = self.watch.query_ttl_s if self.watch is not None else math.inf
        codes = [base64.b64decode(c) for t, c in (h.split(":", 1) for h in reversed(history))
                 if float(t) > now - ttl]  # raw float16 codes (queries.stack_history)
        if not info:
            return ClientStatus.empty(client), codes, items, expired
        flags = [int(i.split(":", 1)[0]) for i in items]
        scores = [float(i.split(":", 1)[1]) for i in items]
        counts = [tuple(int(v) for v in e.split(":")[2:4]) for e in evidence]
        until = info.get("denied_until")
        return ClientStatus(
            client, int(info.get("requests", 0)), int(info.get("flagged", 0)), len(items),
            sum(flags), sum(scores) / len(scores) if scores else 1.0,
            sum(c[0] for c in counts), sum(c[1] for c in counts), len(codes),
            None if until is None else float(until), info.get("reason"),
            int(info.get("denials", 0)),
            float(info["last_seen"]) if "last_seen" in info else None), codes, items, expired

    @reporting
    def _admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               codes: np.ndarray | None, now: float) -> Admission:
        p, w = self.policy, self.watch
        k = self._keys(client)
        out: list[Admission] = []

        def attempt(pipe: Any) -> None:
            out.clear()
            status, history, items, expired = self._read(pipe, client, now)
            if status.denied(now):
                out.append(Admission(False, status, np.zeros(len(flagged), dtype=bool)))
                return
            found = np.zeros(len(flagged), dtype=bool)
            if codes is not None and w is not None:
                found = repeats(stack_history(history, codes.shape[1]),
                                codes, w)
            bad = sum(int(f) for f in flagged)
            verdicts = [f"{int(f)}:{float(s)!r}" for f, s in zip(flagged, scores, strict=True)]
            seen = (verdicts[::-1] + items)[:p.window]  # newest first
            evidence = Evidence(len(seen), sum(int(i.split(":", 1)[0]) for i in seen),
                                status.recent_flagged + bad,
                                status.recent_repeats + int(found.sum()))
            why = judge(evidence, p)
            pipe.multi()
            pipe.sadd(self._all(), client)
            if expired:  # its cool-down ended: start afresh
                pipe.hdel(k["client"], "denied_until", "reason")
                pipe.delete(k["verdicts"], k["evidence"], k["queries"])
            if verdicts:
                pipe.lpush(k["verdicts"], *verdicts)
            pipe.ltrim(k["verdicts"], 0, p.window - 1)
            pipe.zremrangebyscore(k["evidence"], "-inf", repr(now - p.window_s))
            if bad or found.any():
                pipe.zadd(k["evidence"], {f"{now!r}:{time.monotonic_ns()}:{bad}:"
                                          f"{int(found.sum())}": now})
            pipe.expire(k["evidence"], math.ceil(p.window_s))
            if codes is not None and w is not None:
                pipe.lpush(k["queries"], *(f"{now!r}:{base64.b64encode(c.tobytes()).decode()}"
                                           for c in codes))
                pipe.ltrim(k["queries"], 0, w.query_history - 1)
                pipe.expire(k["queries"], math.ceil(w.query_ttl_s))
            pipe.hincrby(k["client"], "requests", len(verdicts))
            pipe.hincrby(k["client"], "flagged", bad)
            pipe.hset(k["client"], "last_seen", repr(now))
            if why is not None:
                until = now + p.cooldown_s if p.cooldown_s > 0 else math.inf
                pipe.hset(k["client"], mapping={"denied_until": repr(until), "reason": why})
                pipe.hincrby(k["client"], "denials", 1)
            out.append(Admission(why is None, status, found, why is not None))

        self.redis.transaction(attempt, *k.values())
        decided = out[0]
        return Admission(decided.answered, self.get(client, now), decided.repeats,
                         decided.denied_now)

    @reporting
    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        return self._read(self.redis, client, now)[0]

    @reporting
    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names: set[str] = self.redis.smembers(self._all())  # type: ignore[assignment]
        return [self.get(c, now) for c in sorted(names)]

    @reporting
    def clear(self, client: str) -> ClientStatus:
        k = self._keys(client)
        with self.redis.pipeline() as pipe:
            pipe.hdel(k["client"], "denied_until", "reason")
            pipe.delete(k["verdicts"], k["evidence"], k["queries"])
            pipe.execute()
        return self.get(client)

    @reporting
    def probe(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()
