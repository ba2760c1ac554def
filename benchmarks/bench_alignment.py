"""What one query's alignment costs (:meth:`advguard.serve.matching.Bank.aligned`, the watch's
comparison of a query moved by the guard's shifts and crops with the newest 128 queries of its
client's history, or of the global index), today's code beside the code of an earlier commit
(its ``matching.py`` read from git), on the same queries, interleaved (baseline, today,
baseline, today); the distances must be the same to the bit. Each query is prepared first as
the service prepares it on the inference thread (:func:`~advguard.serve.matching.prepare`,
timed apart: it is not spent under the store's lock). Distinct test images of the guard's
dataset: the first 1,000 as the history, the next ``--queries`` as queries — the traffic
whose queries are aligned at all (a query already found unmoved is not).

    python benchmarks/bench_alignment.py --guard-dir runs/guard-mnist-mat --baseline 785913d
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from common import guard_parser, save

import advguard.serve.matching as today
from advguard.data import load_data
from advguard.serve import Guard
from advguard.serve.queries import QueryWatch, encode

HISTORY = 1000


def baseline(rev: str, folder: Path) -> ModuleType:
    """``src/advguard/serve/matching.py`` as it was at ``rev``, imported as a module."""
    text = subprocess.check_output(["git", "show", f"{rev}:src/advguard/serve/matching.py"],
                                   cwd=Path(__file__).parent)
    path = folder / "matching_baseline.py"
    path.write_bytes(text)
    spec = importlib.util.spec_from_file_location("matching_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["matching_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(m: ModuleType, codes: np.ndarray, moved: np.ndarray | None, watch: QueryWatch,
          n: int) -> tuple[float, float, list[np.ndarray]]:
    """Milliseconds per query prepared, and aligned against the history's newest
    ``ALIGN_ROWS``; the distances."""
    history = m.Bank.of(codes[:HISTORY])
    t0 = time.perf_counter()
    queries = m.prepare(codes[HISTORY:HISTORY + n], watch.shift,
                        None if moved is None else moved[HISTORY:HISTORY + n], watch.crop)
    t1 = time.perf_counter()
    rows = np.arange(HISTORY - today.ALIGN_ROWS, HISTORY)
    below = watch.view_threshold
    out = [history.aligned(queries, i, rows, below, watch.shift, None, watch.crop)
           for i in range(n)]
    return 1000 * (t1 - t0) / n, 1000 * (time.perf_counter() - t1) / n, out


def main() -> None:
    parser = guard_parser("alignment")
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timings of each")
    args = parser.parse_args()
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    assert watch is not None and watch.view_threshold is not None and (watch.shift or watch.crop)
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(HISTORY + args.queries)])
    codes, moved = encode(x), watch.windows(x)
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline(args.baseline, Path(tmp))
        ms: dict[str, list[float]] = {"baseline": [], "today": []}
        prepared: dict[str, list[float]] = {"baseline": [], "today": []}
        same = True
        for _ in range(args.rounds):
            pa, a, want = timed(old, codes, moved, watch, args.queries)
            pb, b, got = timed(today, codes, moved, watch, args.queries)
            ms["baseline"].append(a)
            ms["today"].append(b)
            prepared["baseline"].append(pa)
            prepared["today"].append(pb)
            same &= all(np.array_equal(u, v) for u, v in zip(want, got, strict=True))
    result: dict[str, Any] = {"baseline": args.baseline, "queries": args.queries,
                              "rows": today.ALIGN_ROWS, "shift": watch.shift,
                              "crop": watch.crop, "ms_per_query": ms,
                              "prepare_ms_per_query": prepared,
                              "speedup": float(np.median(ms["baseline"]) / np.median(ms["today"])),
                              "identical": bool(same), "threads": torch.get_num_threads()}
    print(result, flush=True)
    save(args.out, {"guard": guard.config.dataset, **result}, args.guard_dir)


if __name__ == "__main__":
    main()
