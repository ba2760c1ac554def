"""Where the per-client state of :mod:`advguard.serve.policy` lives; both stores have the same
semantics.

* :class:`~advguard.serve.sqlite_store.SQLiteStore` — one file (WAL mode), every update one
  ``BEGIN IMMEDIATE`` transaction, so several worker processes on one machine share it and it
  survives a restart;
* :class:`~advguard.serve.redis_store.RedisStore` — a Redis server, every admission one
  optimistic transaction (``WATCH`` … ``MULTI``/``EXEC``), so service replicas on several
  machines share one view of every client.

:func:`open_store` opens either from a URL.

A store checks itself when it opens (SQLite: ``PRAGMA quick_check`` and the schema; Redis: a
ping) and refuses to open with a :class:`~advguard.errors.StateError` that names the file or
server and what to do. An error while serving is a ``StateError`` too (the service answers 503:
it does not answer a client whose verdicts it cannot count), and :meth:`health` reports it
until an operation succeeds again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from advguard.errors import InputError
from advguard.serve.policy import Policy, Store
from advguard.serve.queries import QueryWatch
from advguard.serve.redis_store import RedisStore
from advguard.serve.sqlite_store import SQLiteStore


def reset_sqlite(path: str | Path) -> Path | None:
    """Move a SQLite state file (and its WAL files) aside, so the next store starts empty;
    returns where the copy went (None when there was no file)."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy = path.with_name(f"{path.name}.{stamp}.bak")
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            shutil.move(part, copy.with_name(copy.name + suffix))
    return copy


def sqlite_path(url: str | None, default_path: Path) -> Path | None:
    """The SQLite file a state URL names (``default_path`` for None), or None for Redis."""
    if url is None:
        return default_path
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise InputError(f"give SQLite state as sqlite:///path/to/file.db, got {url!r}")
        return Path(path)
    if scheme in ("redis", "rediss", "unix"):
        return None
    raise InputError(f"unknown state store {url!r}: use sqlite:///FILE or redis://HOST:PORT/DB")


def open_store(url: str | None, default_path: Path, policy: Policy,
               watch: QueryWatch | None = None) -> Store:
    """``sqlite:///path`` (default: ``default_path``) or ``redis://host:port/db``; ``watch``:
    the stateful detection of query-based attacks (None: off)."""
    path = sqlite_path(url, default_path)
    if path is None:
        assert url is not None
        return RedisStore(url, policy, watch)
    return SQLiteStore(path, policy, watch)


__all__ = ["RedisStore", "SQLiteStore", "open_store", "reset_sqlite", "sqlite_path"]
