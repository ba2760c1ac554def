"""What one query's alignment costs (:meth:`advguard.serve.matching.Bank.aligned`, the watch's
comparison of a query moved by up to 2 pixels with its client's newest 128 queries), today's
code beside the code of an earlier commit (its ``matching.py`` read from git), on the same
queries, interleaved (baseline, today, baseline, today); the distances must be the same to the
bit. Distinct test images of the guard's dataset: the first 1,000 as the history, the next
``--queries`` as queries — the traffic whose queries are aligned at all (a query already found
unmoved is not).

    python benchmarks/bench_alignment.py --guard-dir runs/guard-mnist-eps --baseline 9a76c53
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
from advguard.serve.queries import SHIFT, encode, moves

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


def timed(m: ModuleType, codes: np.ndarray, moved: np.ndarray | None, below: float,
          n: int) -> tuple[float, list[np.ndarray]]:
    """Milliseconds per query aligned against the history's newest ``ALIGN_ROWS``, and the
    distances."""
    history, queries = m.Bank.of(codes[:HISTORY]), m.Bank.of(codes[HISTORY:HISTORY + n])
    rows = np.arange(HISTORY - today.ALIGN_ROWS, HISTORY)
    t0 = time.perf_counter()
    out = [history.aligned(queries, i, rows, below, SHIFT,
                           None if moved is None else moved[HISTORY + i]) for i in range(n)]
    return 1000 * (time.perf_counter() - t0) / n, out


def main() -> None:
    parser = guard_parser("alignment")
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    assert watch is not None and watch.view_threshold is not None
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(HISTORY + args.queries)])
    codes, moved = encode(x), moves(x, SHIFT)
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline(args.baseline, Path(tmp))
        ms: dict[str, list[float]] = {"baseline": [], "today": []}
        same = True
        for _ in range(2):
            a, want = timed(old, codes, moved, watch.view_threshold, args.queries)
            b, got = timed(today, codes, moved, watch.view_threshold, args.queries)
            ms["baseline"].append(a)
            ms["today"].append(b)
            same &= all(np.array_equal(u, v) for u, v in zip(want, got, strict=True))
    result: dict[str, Any] = {"baseline": args.baseline, "queries": args.queries,
                              "rows": today.ALIGN_ROWS, "ms_per_query": ms,
                              "speedup": float(np.median(ms["baseline"]) / np.median(ms["today"])),
                              "identical": bool(same), "threads": torch.get_num_threads()}
    print(result, flush=True)
    save(args.out, {"guard": guard.config.dataset, **result}, args.guard_dir)


if __name__ == "__main__":
    main()
