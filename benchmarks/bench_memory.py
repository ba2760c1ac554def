"""Peak memory does not grow with the data: one training epoch and one detector-bank fit on
ImageFolder sets of real CIFAR-10 images upsampled to 224×224 JPEG, at two sizes (default 5,000
and 50,000 training images), each command run under ``/usr/bin/time -v`` (its peak resident
set size, the process and its DataLoader workers counted separately: the largest is reported).

The model is advguard's ``small-cnn`` (the benchmark measures the data path, not a large
network's weights); ``--workers 2`` decode in worker processes.

Run: ``python benchmarks/write_imagefolder.py runs/cifar224-5k --train 5000 --test 500 --size
224 --jpeg`` (and ``runs/cifar224-50k --train 50000``), then ``python benchmarks/bench_memory.py
runs/cifar224-5k runs/cifar224-50k``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save


def measured(args: list[str]) -> dict[str, float]:
    """Peak RSS (GB) and wall time (s) of ``advguard ARGS`` under /usr/bin/time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "advguard.cli", *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"advguard {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"peak_rss_gb": kb / 1024**2, "seconds": seconds, "stdout": proc.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    for folder in args.folders:
        images = sum(1 for _ in (folder / "train").rglob("*.jpg"))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "model.safetensors"
            common = ["--data", f"imagefolder:{folder}", "--workers", str(args.workers)]
            train = measured(["train", str(ckpt), *common, "--image-size", "224", "--model",
                              "small-cnn", "--epochs", "1", "--batch-size", "64", "-q"])
            fit = measured(["guard", "fit", str(ckpt), "--out", str(Path(tmp) / "guard"),
                            "--workers", str(args.workers), "--k", "100", "-q"])
        rows[str(images)] = {"train_one_epoch": train, "guard_fit": fit}
        print(images, rows[str(images)])
    sizes = sorted(rows, key=int)
    small, large = rows[sizes[0]], rows[sizes[-1]]
    ratios = {step: large[step]["peak_rss_gb"] / small[step]["peak_rss_gb"]
              for step in ("train_one_epoch", "guard_fit")}
    path = save("memory", {
        "what": "peak RSS of `advguard train` (one epoch, small-cnn, 224x224, batch 64) and "
                "`advguard guard fit` (k = 100) on ImageFolder sets of real CIFAR-10 images "
                "upsampled to 224x224 JPEG, DataLoader workers as given",
        "workers": args.workers, "rows": rows, "ratio_largest_to_smallest": ratios})
    print(ratios, path)


if __name__ == "__main__":
    main()
