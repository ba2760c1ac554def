"""The guard service under load with everything on (query watch, global index, SQLite state),
beside the same service with the watch off and the model + detector in-process at batch 1,
measured side by side in one run; and what the global index costs: its memory per million
queries (SQLite file growth and Redis ``MEMORY USAGE`` of the stream, per query) and the time
one admission spends comparing with it.

The load generator shares the machine's cores with the service: by default (``--generators
raw``) it encodes every request before the clock starts and sends them over kept-alive asyncio
streams; ``httpx`` posts each request through httpx, encoding it in the timed loop (the
benchmark's first generator, 1.5 ms of CPU a request on the 2-core machine against 0.1 ms).
Each run reports the service's CPU time a request (its process and workers, from /proc) and
the generator's.

    python benchmarks/bench_guard_load.py --guard-dir runs/guard-mnist
    python benchmarks/bench_guard_load.py --guard-dir runs/guard-mnist-mat \
        --settings everything-on,watch-off --generators raw,httpx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_guard import LOAD_CLIENTS, in_process, load
from common import hold, redis_server, save, start_server

from advguard.data import load_data
from advguard.serve import Guard, Policy, read_keys, write_keys
from advguard.serve.guard import KEYS, Client
from advguard.serve.matching import Ring, detect
from advguard.serve.queries import encode
from advguard.serve.state import kept

RING_ROWS = 20_000  # rows written to measure the index's memory per query
# the services measured: name -> arguments of `advguard serve`. Two workers: two processes
# sharing the SQLite state (each its own copies of the histories and the index), the GIL no
# longer one for the whole service
SETTINGS = {"everything-on": (), "everything-on-1-thread": ("--threads", "1"),
            "everything-on-2-workers": ("--workers", "2"),
            "everything-on-2-workers-2-threads": ("--workers", "2", "--threads", "2"),
            "watch-off": ("--no-query-watch",)}


def ring_memory(guard: Guard, x: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Bytes per query of the global index: SQLite (file growth) and Redis (stream)."""
    from advguard.serve.stores import RedisStore, SQLiteStore

    watch = guard.config.watch()
    assert watch is not None and watch.linking
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    codes = encode(x[:1000])
    rows = [(i + 1, f"client-{i % 100}", 1.0, codes[i % len(codes)].tobytes(),
             kept({"class": 1}, 1)) for i in range(RING_ROWS)]
    out: dict[str, Any] = {"rows": RING_ROWS, "code_bytes": int(codes[0].nbytes)}
    path = folder / "bench-ring.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = SQLiteStore(path, quiet, watch)
    db = store._connect()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.stat().st_size
    db.executemany("INSERT INTO ring (client, t, code, answer) VALUES (?, ?, ?, ?)",
                   [(c, t, q, a) for _, c, t, q, a in rows])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out["sqlite_bytes_per_query"] = (path.stat().st_size - before) / RING_ROWS
    store.close()
    ring = Ring(RING_ROWS)
    ring.extend(rows, codes.shape[1])
    # the columns as allocated (up to twice the rows they hold) and the answers' strings
    out["process_bytes_per_query"] = (ring.rows.nbytes
                                      + sum(len(a) + 49 for a in ring.answers)) / RING_ROWS
    none = codes[:0]
    for size in (watch.query_global, RING_ROWS):  # one admission's comparison, one query
        part = Ring(size)
        part.extend(rows[-size:], codes.shape[1])
        detect(none, [], codes[:1], ["{}"], watch, part, "someone")
        t0 = time.perf_counter()
        for i in range(200):
            detect(none, [], codes[i:i + 1], ["{}"], watch, part, "someone")
        out[f"compare_ms_ring_{size}"] = 1000 * (time.perf_counter() - t0) / 200
    if shutil.which("redis-server") is not None:
        with redis_server(6392) as url:
            rs = RedisStore(url, quiet, watch)
            for i in range(0, 2000, 50):  # through the store, as the service writes it
                rs.admit(f"client-{i // 50}", [False] * 50, [1.0] * 50, codes[i % 1000:][:50],
                         now=1.0)
            used = rs.redis.memory_usage("advguard:ring", samples=0)
            out["redis_bytes_per_query"] = used / min(2000, watch.query_global)
            rs.close()
    out["mb_per_million_queries"] = {k[:-len("_bytes_per_query")]: round(v, 1)
                                     for k, v in out.items() if k.endswith("_bytes_per_query")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="guard-load")
    parser.add_argument("--port", type=int, default=8733)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated services to measure, of {', '.join(SETTINGS)}")
    parser.add_argument("--generators", default="raw",
                        help="comma-separated load generators, each against a fresh service: "
                             "raw (requests encoded before the clock, asyncio streams) or "
                             "httpx (each request encoded and posted by httpx)")
    parser.add_argument("--clients", type=int, default=LOAD_CLIENTS,
                        help="concurrent one-image clients")
    args = parser.parse_args()
    hold(args.guard_dir)  # one benchmark at a time on a guard folder
    guard = Guard.load(args.guard_dir)
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(len(test))])
    result: dict[str, Any] = {}
    generators = args.generators.split(",")
    for name in args.settings.split(","):
        extra = SETTINGS[name]
        ids = [f"load-{name}-{k}" for k in range(args.clients)]
        keys = read_keys(args.guard_dir / KEYS)
        keys.update({f"{c}-key-{'x' * 16}": Client(c) for c in ids})
        write_keys(args.guard_dir / KEYS, keys)
        key_of = {c.id: k for k, c in keys.items()}
        for generator in generators:  # each against a fresh service and state file
            proc = start_server(args.guard_dir, args.port, args.guard_dir / "load-clients.db",
                                *extra)
            try:
                run = asyncio.run(load(f"http://127.0.0.1:{args.port}",
                                       [key_of[c] for c in ids], x, generator=generator,
                                       clients=args.clients, server_pid=proc.pid))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            local = in_process(guard, x)  # right after, on the same machine state
            run["in_process_images_per_s"] = local
            run["service_over_in_process"] = run["requests_per_s"] / local
            label = name if len(generators) == 1 else f"{name}-{generator}"
            result[label] = run
            print(label, json.dumps(run), flush=True)
    result["global_index"] = ring_memory(guard, x, args.guard_dir)
    print(json.dumps(result["global_index"]), flush=True)
    save(args.out, {"guard": json.loads((args.guard_dir / "guard.json").read_text()),
                    "policy": Policy().to_json(), "torch_threads": torch.get_num_threads(),
                    "numpy": np.__version__, **result}, args.guard_dir)


if __name__ == "__main__":
    main()
