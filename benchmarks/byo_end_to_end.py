"""A model advguard does not define, on a folder of real images, end to end through the CLI.

CIFAR-10's real images written once as PNG files in ImageFolder layout (``write_imagefolder.py``)
→ ``advguard train --model torchvision:resnet18 --optimizer sgd --recipe fgsm-rs --strengths
4/255,8/255`` → ``evaluate`` (white-box PGD) → ``audit --only-autoattack`` on a slice → ``guard
fit`` → ``serve`` on loopback, and one test PNG posted to it. Every command, its output and the
numbers go to ``OUT/summary.json``, rewritten after every step; a step whose output exists
(the checkpoint, ``pgd.json``, ``audit.json``, the guard folder) is not run again, so an
interrupted run resumes where it stopped.

Run: ``python benchmarks/write_imagefolder.py runs/cifar-png --train 50000 --test 10000`` then
``python benchmarks/byo_end_to_end.py runs/cifar-png docs/results/byo-cifar10-resnet18``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def advguard(*args: str, log: Path) -> str:
    """Run ``advguard ARGS`` with this interpreter; its output is appended to ``log``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "advguard.cli", *args], capture_output=True,
                          text=True)
    with log.open("a") as f:
        f.write(f"$ advguard {' '.join(args)}\n{proc.stdout}{proc.stderr[-2000:]}"
                f"({time.perf_counter() - t0:.0f} s, exit {proc.returncode})\n\n")
    if proc.returncode != 0:
        raise SystemExit(f"advguard {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def save(out: Path, summary: dict) -> None:
    """Write ``OUT/summary.json`` atomically (a finished step is never half-written)."""
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    ckpt = Path("runs") / "byo-resnet18.safetensors"
    data = ["--data", f"imagefolder:{args.folder}", "--workers", str(args.workers)]
    summary: dict = {"folder": str(args.folder), "epochs": args.epochs}
    if not ckpt.exists():
        advguard("train", str(ckpt), *data, "--model", "torchvision:resnet18", "--optimizer",
                 "sgd", "--lr", str(args.lr), "--weight-decay", "5e-4", "--recipe", "fgsm-rs",
                 "--strengths", "4/255,8/255", "--epochs", str(args.epochs), "--augment",
                 "--device", "cpu", log=log)
    from advguard.io import read_metadata

    meta = read_metadata(ckpt)
    summary["train"] = {k: meta[k] for k in ("test_accuracy", "train_seconds", "history",
                                             "train_config", "model", "data")}
    save(out, summary)
    if not (out / "pgd.json").exists():
        advguard("evaluate", str(ckpt), "--attack", "white-box-pgd", "--grid",
                 "0,2/255,4/255,8/255", "--test-limit", "1000", "--pgd-steps", "20",
                 "--pgd-restarts", "1", "--workers", str(args.workers), "-q",
                 "--out", str(out / "pgd.json"), log=log)
    summary["pgd"] = json.loads((out / "pgd.json").read_text())
    save(out, summary)
    if not (out / "audit.json").exists():
        advguard("audit", str(ckpt), "--only-autoattack", "--eps", "8/255", "--test-limit",
                 "200", "--workers", str(args.workers), "--out", str(out / "audit.json"), "-q",
                 log=log)
    summary["autoattack"] = json.loads((out / "audit.json").read_text())
    save(out, summary)
    guard = Path("runs") / "byo-guard"
    if not (guard / "guard.json").exists():
        advguard("guard", "fit", str(ckpt), "--out", str(guard), "--workers",
                 str(args.workers), "-q", log=log)
    summary["guard"] = json.loads((guard / "guard.json").read_text())
    save(out, summary)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "advguard.cli", "serve", str(guard),
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=os.environ)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        keys = json.loads((guard / "keys.json").read_text())["keys"]
        key = next(k for k, who in keys.items() if not who["admin"])
        image = sorted((args.folder / "test" / "cat").iterdir())[0]
        answer = httpx.post(f"{url}/v1/predict", headers={"X-API-Key": key}, timeout=60,
                            files=[("files", (image.name, image.read_bytes(), "image/png"))])
        summary["served"] = {"image": str(image), "status": answer.status_code,
                             "answer": answer.json()}
    finally:
        server.terminate()
        server.wait(30)
    save(out, summary)
    print(json.dumps(summary["served"], indent=2))


if __name__ == "__main__":
    main()
