"""The accuracy-matrix stage of the default MNIST white-box pipeline (`advguard reproduce mat
--setting white-box`: one single-strength model per candidate strength, PGD-10 on 1,000
validation images), wall time side by side: one process with 2 threads vs. torchrun with 2
processes of 1 thread each (rows spread over the ranks), on this 2-core machine.

    python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

HERE = Path(__file__).parent


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    return float(re.search(r"rows in ([\d.]+) s", out).group(1)) if "rows in" in out else wall


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    prepared = root / "prepared"
    # the crafting model and the MSSIM bound, once (the matrix needs its candidates)
    subprocess.run([sys.executable, "-c", (
        "from advguard.reproduce.mat import MatConfig\n"
        "from advguard.reproduce.mat.stages import Mat, load_data, candidates\n"
        "from advguard.reproduce.rundir import open_run\n"
        f"with open_run(MatConfig(setting='white-box'), {str(prepared)!r}) as (c, r):\n"
        "    print(candidates(Mat(c, r, load_data(c), progress=False)))")], check=True)
    times = {}
    for name, threads, prefix in (
            ("1 process x 2 threads", 2, [sys.executable]),
            ("torchrun 2 processes x 1 thread", 1,
             [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2"])):
        out = root / name.split()[0]
        shutil.copytree(prepared, out)
        times[name] = run([*prefix, str(HERE / "matrix_stage.py"), str(out)], threads)
        print(f"{name}: {times[name]:.1f} s")
    rows = len(list((root / "1" / "checkpoints").glob("matrix-*.json")))
    save("distributed_matrix", {"stage": "accuracy matrix, MNIST white-box defaults",
                                "rows": rows, "wall_s": times,
                                "two_processes_over_one": times["torchrun 2 processes x 1 thread"]
                                / times["1 process x 2 threads"]})
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
