"""Client state in one SQLite file (WAL mode), every update one ``BEGIN IMMEDIATE``
transaction, so several worker processes on one machine share it and it survives a restart
(the semantics of every store: :mod:`advguard.serve.policy`; the Redis store beside it:
:mod:`advguard.serve.redis_store`; :func:`advguard.serve.stores.open_store` opens either).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
from advguard.serve.queries import QueryWatch, repeats

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0,
    flagged INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0,
    denied_until REAL, reason TEXT, denials INTEGER NOT NULL DEFAULT 0, last_seen REAL);
CREATE TABLE IF NOT EXISTS verdicts (
    client TEXT NOT NULL, seq INTEGER NOT NULL, flagged INTEGER NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (client, seq));
CREATE TABLE IF NOT EXISTS evidence (
    client TEXT NOT NULL, t REAL NOT NULL, flagged INTEGER NOT NULL, repeats INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS evidence_client ON evidence (client, t);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY, client TEXT NOT NULL, t REAL NOT NULL, code BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS queries_client ON queries (client, id);
CREATE INDEX IF NOT EXISTS queries_client_t ON queries (client, t);
"""


_COLUMNS = {"clients": ["client", "requests", "flagged", "seq", "denied_until", "reason",
                        "denials", "last_seen"],
            "verdicts": ["client", "seq", "flagged", "score"],
            "evidence": ["client", "t", "flagged", "repeats"],
            "queries": ["id", "client", "t", "code"]}

CACHED_CLIENTS = 256  # clients whose query history a process keeps read (≤ 512 KB each)


@dataclass(frozen=True)
class _History:
    """One client's rows of the ``queries`` table as this process last read them (id order)."""

    ids: np.ndarray  # (n,) int64
    times: np.ndarray  # (n,) float64
    codes: np.ndarray  # (n, dims) float16

    @classmethod
    def of(cls, rows: Sequence[tuple[int, float, bytes]], dims: int) -> _History:
        rows = [r for r in rows if len(r[2]) == 2 * dims]  # codes of this encoding only
        return cls(np.array([r[0] for r in rows], dtype=np.int64),
                   np.array([r[1] for r in rows], dtype=np.float64),
                   np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float16)
                   .reshape(-1, dims))

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: _History) -> _History:
        return _History(np.concatenate([self.ids, other.ids]),
                        np.concatenate([self.times, other.times]),
                        np.concatenate([self.codes, other.codes]))

    def __getitem__(self, keep: slice | np.ndarray) -> _History:
        return _History(self.ids[keep], self.times[keep], self.codes[keep])


class SQLiteStore(CheckedStore):
    """Client state in one SQLite file, safe for several processes (WAL, immediate locks).

    ``synchronous=NORMAL``: a committed update survives the service crashing or restarting;
    only a power loss can take the last few back (SQLite's recommended setting for WAL)."""

    kind = "sqlite"
    backend_errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: str | Path, policy: Policy,
                 watch: QueryWatch | None = None) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.policy = policy
        self.watch = watch
        if self.path.is_dir():
            raise StateError(f"client state {self.path} is a folder: give a file, "
                             "sqlite:///path/to/clients.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._histories: OrderedDict[str, _History] = OrderedDict()  # see _history
        try:
            db = self._connect()
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            for table, columns in _COLUMNS.items():  # before anything is written to it
                found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
                if found and found != columns:
                    raise sqlite3.DatabaseError(f"table {table} has columns {found}, not the "
                                                "client state's")
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise StateError(
                f"{self.path} is not a usable client-state database "
                f"({str(exc).splitlines()[0]}): move it aside, or start with --reset-state "
                "(which keeps a copy beside it)") from None

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

    @reporting
    def _admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               codes: np.ndarray | None, now: float) -> Admission:
        p, w = self.policy, self.watch
        with self._transaction() as db:
            self._expire(db, client, now)
            status = self._status(db, client, now)
            if status.denied(now):  # refused, and nothing it sent is counted
                return Admission(False, status, np.zeros(len(flagged), dtype=bool))
            found = np.zeros(len(flagged), dtype=bool)
            if codes is not None and w is not None:
                found = self._watch(db, client, codes, w, now)
            db.execute("INSERT OR IGNORE INTO clients (client) VALUES (?)", (client,))
            (seq,) = db.execute("SELECT seq FROM clients WHERE client = ?", (client,)).fetchone()
            rows = [(client, seq + i + 1, int(f), float(s))
                    for i, (f, s) in enumerate(zip(flagged, scores, strict=True))]
            db.executemany("INSERT INTO verdicts VALUES (?, ?, ?, ?)", rows)
            seq += len(rows)
            db.execute("DELETE FROM verdicts WHERE client = ? AND seq <= ?",
                       (client, seq - p.window))
            bad = sum(int(f) for f in flagged)
            db.execute("DELETE FROM evidence WHERE client = ? AND t <= ?",
                       (client, now - p.window_s))
            if bad or found.any():
                db.execute("INSERT INTO evidence VALUES (?, ?, ?, ?)",
                           (client, now, bad, int(found.sum())))
            db.execute("UPDATE clients SET requests = requests + ?, flagged = flagged + ?, "
                       "seq = ?, last_seen = ? WHERE client = ?",
                       (len(rows), bad, seq, now, client))
            status = self._status(db, client, now)
            why = judge(Evidence(status.window, status.window_flagged, status.recent_flagged,
                                 status.recent_repeats), p)
            if why is not None:
                until = now + p.cooldown_s if p.cooldown_s > 0 else math.inf
                db.execute("UPDATE clients SET denied_until = ?, reason = ?, "
                           "denials = denials + 1 WHERE client = ?", (until, why, client))
                status = self._status(db, client, now)
        return Admission(why is None, status, found, why is not None)

    def _watch(self, db: sqlite3.Connection, client: str, codes: np.ndarray, w: QueryWatch,
               now: float) -> np.ndarray:
        """The attack-process detections among ``codes``, which join the client's history
        (expired queries and those past its size leave it)."""
        h = self._history(db, client, codes.shape[1])
        old = h.times <= now - w.query_ttl_s
        if old.any():
            db.executemany("DELETE FROM queries WHERE id = ?", [(int(i),) for i in h.ids[old]])
            h = h[~old]
        found = repeats(h.codes, codes, w)
        ids = [db.execute("INSERT INTO queries (client, t, code) VALUES (?, ?, ?)",
                          (client, now, c.tobytes())).lastrowid for c in codes]
        h = h + _History(np.array(ids, dtype=np.int64), np.full(len(ids), now), codes)
        if len(h) > w.query_history:
            db.execute("DELETE FROM queries WHERE client = ? AND id <= ?",
                       (client, int(h.ids[-w.query_history - 1])))
            h = h[-w.query_history:]
        self._histories[client] = h
        self._histories.move_to_end(client)
        if len(self._histories) > CACHED_CLIENTS:
            self._histories.popitem(last=False)
        return found

    def _history(self, db: sqlite3.Connection, client: str, dims: int) -> _History:
        """The client's stored queries (every process's), inside the admission's transaction:
        only rows newer than this process's copy are read, once the copy is checked (its last
        row unchanged; row count and first id agreeing); else the history is read whole."""
        count, first = db.execute("SELECT COUNT(*), MIN(id) FROM queries WHERE client = ?",
                                  (client,)).fetchone()
        h = self._histories.get(client)
        if count and h is not None and len(h):
            row = db.execute("SELECT t FROM queries WHERE id = ? AND client = ?",
                             (int(h.ids[-1]), client)).fetchone()
            if row is not None and row[0] == h.times[-1]:
                h = h[h.ids >= first] + _History.of(db.execute(
                    "SELECT id, t, code FROM queries WHERE client = ? AND id > ? ORDER BY id",
                    (client, int(h.ids[-1]))).fetchall(), dims)
                if len(h) == count:
                    return h
        # read whole; codes of another length (an earlier encoding) are of no use: dropped
        db.execute("DELETE FROM queries WHERE client = ? AND length(code) != ?",
                   (client, 2 * dims))
        return _History.of(db.execute("SELECT id, t, code FROM queries WHERE client = ? "
                                      "ORDER BY id", (client,)).fetchall(), dims)

    def _expire(self, db: sqlite3.Connection, client: str, now: float) -> None:
        """A denial whose cool-down has passed ends, and the client starts afresh."""
        row = db.execute("SELECT denied_until FROM clients WHERE client = ?",
                         (client,)).fetchone()
        if row is not None and row[0] is not None and now >= row[0]:
            self._forget(db, client)

    def _forget(self, db: sqlite3.Connection, client: str) -> None:
        """Lift a denial and start the client afresh (its totals stay)."""
        self._histories.pop(client, None)
        db.execute("UPDATE clients SET denied_until = NULL, reason = NULL WHERE client = ?",
                   (client,))
        for table in ("verdicts", "evidence", "queries"):
            db.execute(f"DELETE FROM {table} WHERE client = ?", (client,))

    @reporting
    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        status = self._status(self._connect(), client, now)
        if status.denied_until is not None and now >= status.denied_until:
            with self._transaction() as db:
                self._expire(db, client, now)
                status = self._status(db, client, now)
        return status

    def _status(self, db: sqlite3.Connection, client: str, now: float) -> ClientStatus:
        row = db.execute("SELECT requests, flagged, denied_until, reason, denials, last_seen "
                         "FROM clients WHERE client = ?", (client,)).fetchone()
        if row is None:
            return ClientStatus.empty(client)
        count, bad, mean = db.execute("SELECT COUNT(*), COALESCE(SUM(flagged), 0), "
                                      "COALESCE(AVG(score), 1.0) FROM verdicts "
                                      "WHERE client = ?", (client,)).fetchone()
        recent_bad, recent_rep = db.execute(
            "SELECT COALESCE(SUM(flagged), 0), COALESCE(SUM(repeats), 0) FROM evidence "
            "WHERE client = ? AND t > ?", (client, now - self.policy.window_s)).fetchone()
        ttl = self.watch.query_ttl_s if self.watch is not None else math.inf
        (queries,) = db.execute("SELECT COUNT(*) FROM queries WHERE client = ? AND t > ?",
                                (client, now - ttl)).fetchone()
        return ClientStatus(client, row[0], row[1], count, bad, float(mean), int(recent_bad),
                            int(recent_rep), int(queries), row[2], row[3], row[4], row[5])

    @reporting
    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names = [r[0] for r in self._connect().execute(
            "SELECT client FROM clients ORDER BY client")]
        return [self.get(name, now) for name in names]

    @reporting
    def clear(self, client: str) -> ClientStatus:
        with self._transaction() as db:
            self._forget(db, client)
            return self._status(db, client, time.time())

    @reporting
    def probe(self) -> None:
        db = self._connect()
        db.execute("SELECT client FROM clients LIMIT 1").fetchall()
        for table in ("verdicts", "evidence", "queries"):
            db.execute(f"SELECT client FROM {table} LIMIT 1").fetchall()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
