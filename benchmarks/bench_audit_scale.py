"""How the streamed audit scales, side by side in one run on this machine:

* **ranks** — ``advguard audit --only-autoattack`` on the same images (standard AutoAttack, a
  committed robust model) in one process of one thread, then under ``torchrun
  --nproc_per_node=2`` (one thread each): images per second of each, their ratio, and whether
  every image's outcome is the same;
* **memory** — the peak resident memory (``/usr/bin/time -v``) of one process auditing 1,000
  and then all 10,000 MNIST test images with a cheap model (an untrained ``mlp3``: the attacks
  end at once, so the run measures the streaming, not the attacks).

    python benchmarks/bench_audit_scale.py [--images 200] [--shard 50]

Writes ``benchmarks/results/audit-scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

from advguard.io import file_sha256

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "docs/results/mnist-recipes-validation/trades-0.3-34/model.safetensors"
ADVGUARD = str(Path(sys.executable).with_name("advguard"))


def run(command: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (kB, the largest process) of ``command``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return seconds, peak


def columns(parts: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text())["columns"] for p in (parts / "shards").glob("*")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--shard", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit-scale-"))
    audit = ["audit", str(MODEL), "--only-autoattack", "--test-limit", str(args.images),
             "--shard-size", str(args.shard), "--quiet"]
    one_s, _ = run([ADVGUARD, *audit, "--out", "one.json"], work)
    two_s, _ = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", ADVGUARD, *audit, "--out", "two.json"], work)
    same = columns(work / "one.parts") == columns(work / "two.parts")
    ranks = {"images": args.images, "shard_size": args.shard,
             "one_process_images_per_s": args.images / one_s,
             "two_ranks_images_per_s": args.images / two_s, "speedup": one_s / two_s,
             "same_outcome_for_every_image": same,
             "robust_accuracy": json.loads((work / "one.json").read_text())[
                 "worst_case_accuracy"]}
    print(json.dumps(ranks, indent=1))
    memory = {}
    for n in (1000, 10000):
        cheap = ["audit", "--model", "mlp3", "--data", "mnist", "--only-autoattack",
                 "--test-limit", str(n), "--quiet", "--out", f"mlp-{n}.json"]
        seconds, peak = run([ADVGUARD, *cheap], work)
        memory[str(n)] = {"seconds": seconds, "peak_rss_mib": peak / 1024}
    memory["ratio_10000_to_1000"] = memory["10000"]["peak_rss_mib"] / memory["1000"][
        "peak_rss_mib"]
    print(json.dumps(memory, indent=1))
    save("audit-scale", {"ranks": ranks, "memory": memory,
                         "model": str(MODEL.relative_to(ROOT)),
                         "model_sha256": file_sha256(MODEL),
                         "command": "python benchmarks/bench_audit_scale.py "
                                    f"--images {args.images} --shard {args.shard}"})


if __name__ == "__main__":
    main()
