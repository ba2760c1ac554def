"""Client state in one SQLite file (WAL mode), every update one ``BEGIN IMMEDIATE``
transaction, so several worker processes on one machine share it and it survives a restart
(the semantics of every store: :mod:`advguard.serve.policy`; the Redis store beside it:
:mod:`advguard.serve.redis_store`; :func:`advguard.serve.stores.open_store` opens either).
"""

from __future__ import annotations

import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from advguard.errors import StateError
from advguard.serve import state
from advguard.serve.matching import Bank, Cached, Found, History, Ring, detect
from advguard.serve.policy import Admission, CheckedStore, ClientStatus, Policy, reporting
from advguard.serve.queries import QueryWatch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (client TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY, client TEXT NOT NULL, t REAL NOT NULL, code BLOB NOT NULL,
    answer TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS queries_client ON queries (client, id);
CREATE INDEX IF NOT EXISTS queries_client_t ON queries (client, t);
CREATE TABLE IF NOT EXISTS ring (
    id INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL, t REAL NOT NULL,
    code BLOB NOT NULL, answer TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ring_t ON ring (t);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = {"clients": ["client", "record"],
            "queries": ["id", "client", "t", "code", "answer"],
            "ring": ["id", "client", "t", "code", "answer"],
            "meta": ["key", "value"]}
PRIVATE = 0o600  # the state file and its WAL files: readable by the service's user alone



class SQLiteStore(CheckedStore):
    """Client state in one SQLite file, safe for several processes (WAL, immediate locks).

    ``synchronous=NORMAL``: a committed update survives the service crashing or restarting;
    only a power loss can take the last few back (SQLite's recommended setting for WAL). The
    file and its WAL files are made readable by the service's user alone (0600): the stored
    query codes tell what images each client sent (docs/SERVING.md)."""

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
        self._writer = threading.Lock()  # this process's writers, one at a time
        self._histories = Cached()  # client -> (epoch it was checked in, History)
        # (connection, its data_version) after this process's last commit. A transaction that
        # finds them changed (another connection wrote) starts a new epoch; a copy checked
        # against the table in the current epoch (a history, the index: _ring_epoch) holds
        # what the database holds and is used without reads, any other is checked first
        self._synced: tuple[sqlite3.Connection, int] | None = None
        self._epoch = self._ring_epoch = 0
        self._ring = Ring(watch.query_global) if watch is not None and watch.linking else None
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, PRIVATE))
            db = self._connect()
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            for table, columns in _COLUMNS.items():  # before anything is written to it
                found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
                if found and found != columns:
                    raise sqlite3.DatabaseError(f"table {table} has columns {found}, not the "
                                                "client state's of this version")
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._private()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise StateError(
                f"{self.path} is not a usable client-state database "
                f"({str(exc).splitlines()[0]}): move it aside, or start with --reset-state "
                "(which keeps a copy beside it)") from None

    def _private(self) -> None:
        """The file and its WAL files readable by this user alone (SQLite gives the WAL files
        the database file's mode; a file made by an earlier version may be wider)."""
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix)
            if part.exists() and part.stat().st_mode & 0o777 != PRIVATE:
                part.chmod(PRIVATE)

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
        """One ``BEGIN IMMEDIATE`` transaction: the writers of every process take turns. The
        threads of one process queue on a lock first: left to SQLite's busy handler, a waiting
        thread sleeps in growing steps and a burst of admissions waits hundreds of ms. A
        transaction rolled back drops this process's copies of the histories and the index
        (they are changed in place as the transaction goes). SQLite's ``data_version`` tells
        whether any other connection (another thread's, another worker's) committed since
        this process's last transaction: if none did, the copies checked since are used
        unchecked (see ``_epoch``)."""
        db = self._connect()
        with self._writer:
            db.execute("BEGIN IMMEDIATE")
            try:
                (version,) = db.execute("PRAGMA data_version").fetchone()
                if self._synced is None or self._synced[0] is not db or (
                        self._synced[1] != version):
                    self._epoch += 1  # every copy is checked before it is used again
                yield db
                db.execute("COMMIT")
                # a connection's own commits leave its data_version as it is
                self._synced = (db, version)
            except BaseException:
                self._synced = None
                if db.in_transaction:
                    db.execute("ROLLBACK")
                # the copies read in the transaction were changed in place: read afresh
                self._histories.clear()
                if self._ring is not None:
                    self._ring.reset("")
                raise

    def _load(self, db: sqlite3.Connection, client: str) -> state.Record:
        row = db.execute("SELECT record FROM clients WHERE client = ?", (client,)).fetchone()
        return state.Record.from_json(None if row is None else row[0])

    def _save(self, db: sqlite3.Connection, client: str, record: state.Record) -> None:
        db.execute("INSERT INTO clients VALUES (?, ?) ON CONFLICT (client) DO UPDATE SET "
                   "record = excluded.record", (client, record.to_json()))

    @reporting
    def _admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               queries: Bank | None, now: float, answers: list[str]) -> Admission:
        p, w = self.policy, self.watch
        none = np.zeros(len(flagged), dtype=bool)
        with self._transaction() as db:
            record = self._load(db, client)
            if record.expired(now):
                self._forget(db, client)
            if record.denied(now):  # refused, and nothing it sent is counted
                return Admission(False, self._status(db, client, record, now), none)
            if queries is not None and w is not None:
                found, seen = self._watch(db, client, queries, answers, w, now)
            else:  # no watch: every query answered fresh, nothing counted
                found = Found(none, [None] * len(flagged), [() for _ in flagged])
                seen = state.watched(found, answers, p.flag_beside)
            step = state.admit(record, flagged, scores, seen.repeats, list(seen.links), now, p,
                               seen.flips, seen.as_before)
            self._save(db, client, step.record)
            for other, (n, f) in seen.links.items():  # they count on the linked keys too
                self._save(db, other, state.attribute(self._load(db, other), client, n, now, p,
                                                      f))
            status = self._status(db, client, step.record, now)
        return Admission(step.answered, status, found.detections, step.denied_now, seen.told,
                         seen.as_before)

    def _watch(self, db: sqlite3.Connection, client: str, queries: Bank,
               answers: list[str], w: QueryWatch, now: float) -> tuple[Found, state.Watched]:
        """The watch's findings on the ``queries`` and what they come to; they join the
        client's history and the global index with the answers they are given (expired
        queries and those past their size leave them)."""
        codes = queries.raw
        h = self._history(db, client, codes.shape[1])
        old = h.times <= now - w.query_ttl_s
        if old.any():
            db.executemany("DELETE FROM queries WHERE id = ?", [(int(i),) for i in h.ids[old]])
            h.keep(~old)
        ring = self._read_ring(db, now, w, codes.shape[1])
        found = detect(h.bank, list(h.answers), queries, answers, w, ring, client)
        seen = state.watched(found, answers, self.policy.flag_beside)
        given = seen.kept
        ids = [db.execute("INSERT INTO queries (client, t, code, answer) VALUES (?, ?, ?, ?)",
                          (client, now, c.tobytes(), a)).lastrowid
               for c, a in zip(codes, given, strict=True)]
        h.add(np.array(ids, dtype=np.int64), np.full(len(ids), now), queries, given)
        if len(h) > w.query_history:
            db.execute("DELETE FROM queries WHERE client = ? AND id <= ?",
                       (client, int(h.ids[-w.query_history - 1])))
            h.keep_newest(w.query_history)
        self._histories.put(client, (self._epoch, h))
        if ring is not None:
            rows = [(int(db.execute("INSERT INTO ring (client, t, code, answer) VALUES "
                                    "(?, ?, ?, ?)", (client, now, c.tobytes(), a)).lastrowid
                         or 0), client, now, c.tobytes(), a)
                    for c, a in zip(codes, given, strict=True)]
            ring.extend(rows, codes.shape[1], queries)
            ring.trim(now, w.query_ttl_s)
            db.execute("DELETE FROM ring WHERE id <= ? OR t <= ?",
                       (rows[-1][0] - w.query_global, now - w.query_ttl_s))
        return found, seen

    def _read_ring(self, db: sqlite3.Connection, now: float, w: QueryWatch,
                   dims: int) -> Ring | None:
        """This process's copy of the global index, brought up to date: only the rows added
        since its last read, unless the index changed otherwise (a clear: a new generation)
        or was emptied (its ids behind the copy's)."""
        ring = self._ring
        if ring is None:
            return None
        if self._ring_epoch == self._epoch and ring.dims == dims:
            ring.trim(now, w.query_ttl_s)
            return ring
        self._ring_epoch = self._epoch
        row = db.execute("SELECT value FROM meta WHERE key = 'ring'").fetchone()
        generation = "" if row is None else row[0]
        (top,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM ring").fetchone()
        if generation != ring.generation or top < ring.last_id:
            ring.reset(generation)
        ring.extend(db.execute("SELECT id, client, t, code, answer FROM ring WHERE id > ? "
                               "ORDER BY id", (ring.last_id,)).fetchall(), dims)
        ring.trim(now, w.query_ttl_s)
        return ring

    def _history(self, db: sqlite3.Connection, client: str, dims: int) -> History:
        """The client's stored queries (every process's), inside the admission's transaction:
        only rows newer than this process's copy are read, once the copy is checked (its last
        row unchanged; row count and first id agreeing), or taken as it is when it was checked
        in the current epoch (no other connection wrote since: see ``_transaction``); else it
        is read whole."""
        epoch, h = self._histories.get(client, (None, None))
        if epoch == self._epoch and h is not None:
            return h
        count, first = db.execute("SELECT COUNT(*), MIN(id) FROM queries WHERE client = ?",
                                  (client,)).fetchone()
        if count and h is not None and len(h):
            row = db.execute("SELECT t FROM queries WHERE id = ? AND client = ?",
                             (int(h.ids[-1]), client)).fetchone()
            if row is not None and row[0] == h.times[-1]:
                h.keep(h.ids >= first)
                h.extend(db.execute(
                    "SELECT id, t, code, answer FROM queries WHERE client = ? AND id > ? "
                    "ORDER BY id", (client, int(h.ids[-1]))).fetchall(), dims)
                if len(h) == count:
                    return h
        # read whole; codes of another length (an earlier encoding) are of no use: dropped
        db.execute("DELETE FROM queries WHERE client = ? AND length(code) != ?",
                   (client, 2 * dims))
        return History.of(db.execute("SELECT id, t, code, answer FROM queries "
                                      "WHERE client = ? ORDER BY id", (client,)).fetchall(),
                           dims)

    def _forget(self, db: sqlite3.Connection, client: str) -> None:
        """Start the client afresh: its denial lifted, window, evidence and query history
        emptied (its totals stay), and its queries taken out of the global index."""
        self._histories.pop(client, None)
        self._ring_epoch = -1  # the index's copy is read again (a new generation)
        record = self._load(db, client)
        if record != state.Record():
            self._save(db, client, record.afresh())
        db.execute("DELETE FROM queries WHERE client = ?", (client,))
        if db.execute("DELETE FROM ring WHERE client = ?", (client,)).rowcount:
            db.execute("INSERT INTO meta VALUES ('ring', ?) ON CONFLICT (key) DO UPDATE SET "
                       "value = excluded.value", (secrets.token_hex(8),))

    @reporting
    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        db = self._connect()
        record = self._load(db, client)
        if record.expired(now):
            with self._transaction() as db:
                record = self._load(db, client)
                if record.expired(now):
                    self._forget(db, client)
                    record = self._load(db, client)
        return self._status(db, client, record, now)

    def _status(self, db: sqlite3.Connection, client: str, record: state.Record,
                now: float) -> ClientStatus:
        if record == state.Record():
            return ClientStatus.empty(client)
        ttl = self.watch.query_ttl_s if self.watch is not None else math.inf
        (queries,) = db.execute("SELECT COUNT(*) FROM queries WHERE client = ? AND t > ?",
                                (client, now - ttl)).fetchone()
        return state.status(client, record, int(queries), now, self.policy)

    @reporting
    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names = [r[0] for r in self._connect().execute(
            "SELECT client FROM clients ORDER BY client")]
        return [self.get(name, now) for name in names]

    @reporting
    def clear(self, client: str) -> ClientStatus:
        with self._transaction() as db:
            self._forget(db, client)
            return self._status(db, client, self._load(db, client), time.time())

    @reporting
    def probe(self) -> None:
        db = self._connect()
        for table in _COLUMNS:
            db.execute(f"SELECT * FROM {table} LIMIT 1").fetchall()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
