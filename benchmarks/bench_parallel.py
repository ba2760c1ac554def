"""Parallel MAT: members trained one after another vs. concurrently (the paper's time-vs-memory
trade-off), side by side in one run.

Each mode runs in a fresh interpreter so that its peak memory is its own: sequential = the one
process's peak resident set; concurrent = the parent's peak plus every worker's peak (they are
alive at the same time). Run: ``python benchmarks/bench_parallel.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import save

CHILD = r"""
import functools, json, resource, sys, time
import torch
from advguard.data import load_dataset
from advguard.ensemble import train_parallel
from advguard.models import build_model
from advguard.training import TrainConfig

if __name__ == "__main__":
    workers, n, epochs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data = load_dataset("mnist", limit=n)
    build = functools.partial(build_model, "mlp3", "mnist")
    t0 = time.perf_counter()
    _, res = train_parallel(build, data, [0.1, 0.2, 0.3], None, TrainConfig(epochs=epochs),
                            progress=False, workers=workers)
    wall = time.perf_counter() - t0
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = res.peak_rss_mb if workers > 1 else []
    print(json.dumps({"workers": workers, "wall_s": wall, "parent_peak_mb": parent,
                      "worker_peaks_mb": workers_mb,
                      "total_peak_mb": parent + sum(workers_mb)}))
"""


def run(workers: int, n: int, epochs: int) -> dict:
    script = Path(__file__).parent / "_parallel_child.py"
    script.write_text(CHILD)
    try:
        out = subprocess.run([sys.executable, str(script), str(workers), str(n), str(epochs)],
                             capture_output=True, text=True, check=True)
    finally:
        script.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(n: int = 20000, epochs: int = 2, repeats: int = 2) -> dict:
    rows: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    for _ in range(repeats):  # interleaved
        rows["sequential"].append(run(1, n, epochs))
        rows["concurrent"].append(run(3, n, epochs))
    summary = {k: {"wall_s": min(r["wall_s"] for r in v),
                   "total_peak_mb": max(r["total_peak_mb"] for r in v)} for k, v in rows.items()}
    ratio_t = summary["concurrent"]["wall_s"] / summary["sequential"]["wall_s"]
    ratio_m = summary["concurrent"]["total_peak_mb"] / summary["sequential"]["total_peak_mb"]
    print(f"3 members, {n} MNIST images, {epochs} epochs (white-box, MLP): sequential "
          f"{summary['sequential']['wall_s']:.1f} s / {summary['sequential']['total_peak_mb']:.0f}"
          f" MB; concurrent (3 processes) {summary['concurrent']['wall_s']:.1f} s / "
          f"{summary['concurrent']['total_peak_mb']:.0f} MB; time x{ratio_t:.2f}, memory "
          f"x{ratio_m:.2f}")
    path = save("parallel_members", {"members": 3, "train_size": n, "epochs": epochs,
                                     "runs": rows, "summary": summary,
                                     "time_ratio_concurrent_over_sequential": ratio_t,
                                     "memory_ratio_concurrent_over_sequential": ratio_m})
    print(f"written {path}")
    return summary


if __name__ == "__main__":
    main()
