"""Where the per-client state of :mod:`advguard.serve.policy` lives; both stores have the same
semantics.

* :class:`SQLiteStore` — one file (WAL mode), every update one ``BEGIN IMMEDIATE`` transaction,
  so several worker processes on one machine share it and it survives a restart;
* :class:`RedisStore` — a Redis server, every update one Lua script (atomic on the server), so
  service replicas on several machines share one view of every client.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from advguard.errors import InputError
from advguard.serve.policy import ClientStatus, Policy, Store, reason

# --- SQLite -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0,
    flagged INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0,
    denied_until REAL, reason TEXT, denials INTEGER NOT NULL DEFAULT 0, last_seen REAL);
CREATE TABLE IF NOT EXISTS verdicts (
    client TEXT NOT NULL, seq INTEGER NOT NULL, flagged INTEGER NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (client, seq));
"""


class SQLiteStore:
    """Client state in one SQLite file, safe for several processes (WAL, immediate locks).

    ``synchronous=NORMAL``: a committed update survives the service crashing or restarting;
    only a power loss can take the last few back (SQLite's recommended setting for WAL)."""

    def __init__(self, path: str | Path, policy: Policy) -> None:
        self.path = Path(path)
        self.policy = policy
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._connect()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections stay in the thread that made them)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the writers of every process take turns."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def record(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        p = self.policy
        with self._transaction() as db:
            self._expire(db, client, now)
            db.execute("INSERT OR IGNORE INTO clients (client) VALUES (?)", (client,))
            (seq,) = db.execute("SELECT seq FROM clients WHERE client = ?", (client,)).fetchone()
            rows = [(client, seq + i + 1, int(f), float(s))
                    for i, (f, s) in enumerate(zip(flagged, scores, strict=True))]
            db.executemany("INSERT INTO verdicts VALUES (?, ?, ?, ?)", rows)
            seq += len(rows)
            db.execute("DELETE FROM verdicts WHERE client = ? AND seq <= ?",
                       (client, seq - p.window))
            db.execute("UPDATE clients SET requests = requests + ?, flagged = flagged + ?, "
                       "seq = ?, last_seen = ? WHERE client = ?",
                       (len(rows), sum(int(f) for f in flagged), seq, now, client))
            status = self._status(db, client)
            if (status.denied_until is None and status.window >= p.min_requests
                    and status.window_flagged >= p.flagged_limit * status.window):
                until = now + p.cooldown_s if p.cooldown_s > 0 else math.inf
                db.execute("UPDATE clients SET denied_until = ?, reason = ?, "
                           "denials = denials + 1 WHERE client = ?",
                           (until, reason(status.window_flagged, status.window, p), client))
                status = self._status(db, client)
        return status

    def _expire(self, db: sqlite3.Connection, client: str, now: float) -> None:
        """A denial whose cool-down has passed ends, and the window starts afresh."""
        row = db.execute("SELECT denied_until FROM clients WHERE client = ?",
                         (client,)).fetchone()
        if row is not None and row[0] is not None and now >= row[0]:
            db.execute("UPDATE clients SET denied_until = NULL, reason = NULL WHERE client = ?",
                       (client,))
            db.execute("DELETE FROM verdicts WHERE client = ?", (client,))

    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        status = self._status(self._connect(), client)
        if status.denied_until is not None and now >= status.denied_until:
            with self._transaction() as db:
                self._expire(db, client, now)
                status = self._status(db, client)
        return status

    def _status(self, db: sqlite3.Connection, client: str) -> ClientStatus:
        row = db.execute("SELECT requests, flagged, denied_until, reason, denials, last_seen "
                         "FROM clients WHERE client = ?", (client,)).fetchone()
        count, bad, mean = db.execute("SELECT COUNT(*), COALESCE(SUM(flagged), 0), "
                                      "COALESCE(AVG(score), 1.0) FROM verdicts "
                                      "WHERE client = ?", (client,)).fetchone()
        if row is None:
            return ClientStatus(client, 0, 0, 0, 0, 1.0, None, None, 0, None)
        return ClientStatus(client, row[0], row[1], count, bad, float(mean), row[2], row[3],
                            row[4], row[5])

    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names = [r[0] for r in self._connect().execute(
            "SELECT client FROM clients ORDER BY client")]
        return [self.get(name, now) for name in names]

    def clear(self, client: str) -> ClientStatus:
        with self._transaction() as db:
            db.execute("UPDATE clients SET denied_until = NULL, reason = NULL WHERE client = ?",
                       (client,))
            db.execute("DELETE FROM verdicts WHERE client = ?", (client,))
            return self._status(db, client)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# --- Redis ------------------------------------------------------------------------------------

# KEYS: client hash, verdict list, client set. ARGV: client, now, window, min_requests,
# flagged_limit, cooldown (0 = until cleared), then flagged/score pairs.
_RECORD = """
local h, v, all = KEYS[1], KEYS[2], KEYS[3]
local now, window, minreq = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, cooldown = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('SADD', all, ARGV[1])
local denied = redis.call('HGET', h, 'denied_until')
if denied and denied ~= 'inf' and now >= tonumber(denied) then
  redis.call('HDEL', h, 'denied_until', 'reason'); redis.call('DEL', v); denied = false
end
local n, bad = 0, 0
for i = 7, #ARGV, 2 do
  redis.call('LPUSH', v, ARGV[i] .. ':' .. ARGV[i + 1]); n = n + 1
  bad = bad + tonumber(ARGV[i])
end
redis.call('LTRIM', v, 0, window - 1)
redis.call('HINCRBY', h, 'requests', n); redis.call('HINCRBY', h, 'flagged', bad)
redis.call('HSET', h, 'last_seen', ARGV[2])
local items = redis.call('LRANGE', v, 0, -1)
local count, flagged = #items, 0
for _, item in ipairs(items) do flagged = flagged + tonumber(string.sub(item, 1, 1)) end
if (not denied) and count >= minreq and flagged >= limit * count then
  local t = 'inf'
  if cooldown > 0 then t = tostring(now + cooldown) end
  redis.call('HSET', h, 'denied_until', t, 'reason', flagged .. '/' .. count)
  redis.call('HINCRBY', h, 'denials', 1)
end
return 1
"""

_EXPIRE = """
local denied = redis.call('HGET', KEYS[1], 'denied_until')
if denied and denied ~= 'inf' and tonumber(ARGV[1]) >= tonumber(denied) then
  redis.call('HDEL', KEYS[1], 'denied_until', 'reason'); redis.call('DEL', KEYS[2])
end
return 1
"""


class RedisStore:
    """Client state on a Redis server (``redis://host:port/db``), shared by every replica."""

    def __init__(self, url: str, policy: Policy, prefix: str = "advguard") -> None:
        import redis

        self.policy = policy
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise InputError(f"cannot reach Redis at {url}: {exc}") from None
        self._record = self.redis.register_script(_RECORD)
        self._expire = self.redis.register_script(_EXPIRE)

    def _keys(self, client: str) -> list[str]:
        return [f"{self.prefix}:client:{client}", f"{self.prefix}:verdicts:{client}",
                f"{self.prefix}:clients"]

    def record(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        p = self.policy
        pairs: list[str] = []
        for f, s in zip(flagged, scores, strict=True):
            pairs += [str(int(f)), repr(float(s))]
        self._record(keys=self._keys(client),
                     args=[client, repr(now), p.window, p.min_requests, repr(p.flagged_limit),
                           repr(p.cooldown_s), *pairs])
        return self.get(client, now)

    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        h, v, _ = self._keys(client)
        self._expire(keys=[h, v], args=[repr(now)])
        info: dict[str, str] = self.redis.hgetall(h)  # type: ignore[assignment]
        items: list[str] = self.redis.lrange(v, 0, -1)  # type: ignore[assignment]
        if not info:
            return ClientStatus(client, 0, 0, 0, 0, 1.0, None, None, 0, None)
        flags = [int(i.split(":", 1)[0]) for i in items]
        scores = [float(i.split(":", 1)[1]) for i in items]
        until = info.get("denied_until")
        why = None
        if until is not None:
            bad, count = (int(t) for t in info.get("reason", "0/0").split("/"))
            why = reason(bad, count, self.policy)
        return ClientStatus(
            client, int(info.get("requests", 0)), int(info.get("flagged", 0)), len(items),
            sum(flags), sum(scores) / len(scores) if scores else 1.0,
            None if until is None else float(until), why, int(info.get("denials", 0)),
            float(info["last_seen"]) if "last_seen" in info else None)

    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names: set[str] = self.redis.smembers(self._keys("")[2])  # type: ignore[assignment]
        return [self.get(c, now) for c in sorted(names)]

    def clear(self, client: str) -> ClientStatus:
        h, v, _ = self._keys(client)
        self.redis.hdel(h, "denied_until", "reason")
        self.redis.delete(v)
        return self.get(client)

    def close(self) -> None:
        self.redis.close()


def open_store(url: str | None, default_path: Path, policy: Policy) -> Store:
    """``sqlite:///path`` (default: ``default_path``) or ``redis://host:port/db``."""
    if url is None:
        return SQLiteStore(default_path, policy)
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise InputError(f"give SQLite state as sqlite:///path/to/file.db, got {url!r}")
        return SQLiteStore(path, policy)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, policy)
    raise InputError(f"unknown state store {url!r}: use sqlite:///FILE or redis://HOST:PORT/DB")
