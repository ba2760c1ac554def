"""Whenever a GPU is at hand: run the CUDA tests (``pytest -m gpu``), then time one CIFAR-10
epoch of ``resnet-s`` (FGSM-RS at 8/255, bf16) and a 1,000-image standard AutoAttack of it on
the GPU, and write what it measured to ``benchmarks/results/gpu.json`` (commit it).

    python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import save

ROOT = Path(__file__).resolve().parents[1]
ADVGUARD = str(Path(sys.executable).with_name("advguard"))


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this where a GPU is at hand")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    work = Path(tempfile.mkdtemp(prefix="gpu-"))
    epoch = timed([ADVGUARD, "train", "m.safetensors", "--data", "cifar10", "--model",
                   "resnet-s", "--recipe", "fgsm-rs", "--strengths", "8/255", "--epochs", "1",
                   "--amp", "bf16", "--device", "cuda", "-q"], work)
    audit = timed([ADVGUARD, "audit", "m.safetensors", "--only-autoattack", "--eps", "8/255",
                   "--test-limit", "1000", "--device", "cuda", "--out", "aa.json", "-q"], work)
    result = json.loads((work / "aa.json").read_text())
    save("gpu", {"device": torch.cuda.get_device_name(0),
                 "tests": tests.stdout.strip().splitlines()[-1:], "tests_rc": tests.returncode,
                 "cifar10_epoch_s": epoch, "autoattack_1000_images_s": audit,
                 "autoattack_robust_accuracy": result["worst_case_accuracy"],
                 "model_sha256": result["model"]["file_sha256"]})
    print(tests.stdout[-2000:])
    print(f"CIFAR-10 epoch {epoch:.1f} s; AutoAttack on 1,000 images {audit:.1f} s")


if __name__ == "__main__":
    main()
