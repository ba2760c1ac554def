"""The accuracy-matrix stage of the default MNIST white-box pipeline alone, in the run
directory given (its crafting model and MSSIM bound already there). Runs unchanged under
torchrun, which spreads the rows over the ranks. Used by bench_distributed.py."""

from __future__ import annotations

import sys
import time

from advguard import distributed
from advguard.reproduce.mat import MatConfig
from advguard.reproduce.mat.stages import Mat, load_data, matrix
from advguard.reproduce.rundir import open_run

if __name__ == "__main__":
    distributed.setup("cpu")
    with open_run(MatConfig(setting="white-box"), sys.argv[1]) as (cfg, run):
        m = Mat(cfg, run, load_data(cfg), progress=False)
        distributed.barrier()
        t0 = time.perf_counter()
        rows = matrix(m)
        if distributed.is_main():
            print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
