"""The guard service on MNIST with the committed detector settings (LeNet-5 of the detection
run, k = 1000, PCA + whitening, DW-kNN, 98% of clean validation images kept), over HTTP on
loopback, with the default denial policy:

1. attackers — FGSM at ε = 0.1 / 0.2 / 0.3, PGD-20 at ε = 0.2 / 0.3 and the adaptive attacker
   of the detection results (targeted PGD that pulls the whitened features onto the target
   class), each sending attacked test digits one per request: how many are answered before
   the client is denied;
2. honest clients — the 10,000 clean test digits sent by 100 clients (100 each): how many
   clients are wrongly denied;
3. load — 2,000 requests of one image from 8 concurrent clients: requests/s, p50/p99 latency,
   errors, and the ratio to calling model + detector in-process on the same images one by one.

    python benchmarks/bench_guard.py --run-dir runs/detect-mnist

(the run directory of ``advguard reproduce detect --dataset mnist``; its guard is fitted once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import save

from advguard.attacks import FGSM, PGD, random_targets
from advguard.data import load_dataset
from advguard.detection import FeaturePull
from advguard.serve import Guard, Policy, fit_guard, read_keys, write_keys
from advguard.serve.guard import KEYS, Client

ATTACK_IMAGES = 200
HONEST_CLIENTS, HONEST_EACH = 100, 100
LOAD_REQUESTS, LOAD_CLIENTS = 2000, 8


def attacks(guard: Guard, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = guard.model
    out = {f"fgsm-{e}": FGSM()(model, x, y, e) for e in (0.1, 0.2, 0.3)}
    for e in (0.2, 0.3):
        out[f"pgd20-{e}"] = PGD(steps=20, seed=0)(model, x, y, e)
    pull = FeaturePull(guard.detector, weight=1.0)
    target = random_targets(y, 10, 0)
    out["adaptive-0.2"] = PGD(steps=20, random_start=False, loss=pull, targeted=True)(
        model, x, target, 0.2)
    return out


def start(guard_dir: Path, port: int, state: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "advguard.cli", "serve", str(guard_dir),
                             "--port", str(port), "--state", f"sqlite:///{state}",
                             "--rate", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


async def send(client: httpx.AsyncClient, key: str, image: torch.Tensor) -> httpx.Response:
    return await client.post("/v1/predict", json={"images": image.tolist()},
                             headers={"X-API-Key": key})


async def until_denied(url: str, key: str, images: torch.Tensor) -> dict[str, float | int | None]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        flagged = 0
        for i, image in enumerate(images):
            r = await send(c, key, image)
            if r.status_code == 403:
                return {"answered_before_denial": i, "flagged_while_answered": flagged}
            r.raise_for_status()
            flagged += r.json()["results"][0]["verdict"] == "flagged"
    return {"answered_before_denial": None, "flagged_while_answered": flagged}


async def honest(url: str, keys: list[str], x: torch.Tensor) -> dict[str, float | int]:
    async def one(k: int, c: httpx.AsyncClient) -> tuple[int, int]:
        flagged = denied = 0
        for i in range(k, len(x), len(keys)):  # client k sends every len(keys)-th digit
            r = await send(c, keys[k], x[i])
            if r.status_code == 403:
                denied = 1
                break
            r.raise_for_status()
            flagged += r.json()["results"][0]["verdict"] == "flagged"
        return flagged, denied

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=16)) as c:
        sem = asyncio.Semaphore(16)

        async def limited(k: int) -> tuple[int, int]:
            async with sem:
                return await one(k, c)

        results = await asyncio.gather(*(limited(k) for k in range(len(keys))))
    return {"clients": len(keys), "images": len(x),
            "flagged_share": sum(f for f, _ in results) / len(x),
            "clients_denied": sum(d for _, d in results)}


async def load(url: str, keys: list[str], x: torch.Tensor) -> dict[str, float | int]:
    latencies: list[float] = []
    errors = 0

    async def worker(k: int, c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in range(k, LOAD_REQUESTS, LOAD_CLIENTS):
            t0 = time.perf_counter()
            r = await send(c, keys[k], x[i % len(x)])
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=LOAD_CLIENTS)) as c:
        await send(c, keys[0], x[0])  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, c) for k in range(LOAD_CLIENTS)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": LOAD_REQUESTS, "concurrent_clients": LOAD_CLIENTS, "errors": errors,
            "requests_per_s": LOAD_REQUESTS / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))]}


def in_process(guard: Guard, x: torch.Tensor) -> float:
    guard.verdicts(x[:1])
    t0 = time.perf_counter()
    for i in range(LOAD_REQUESTS):
        guard.verdicts(x[i % len(x)][None])
    return LOAD_REQUESTS / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/detect-mnist"))
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--port", type=int, default=8711)
    args = parser.parse_args()
    if not (args.guard_dir / "guard.json").exists():
        fit_guard(args.run_dir, args.guard_dir, progress=True)  # k: KNNOptions' default
    guard = Guard.load(args.guard_dir)
    keys = {k: c for k, c in read_keys(args.guard_dir / KEYS).items() if c.admin}
    test = load_dataset("mnist", "test")
    adv = attacks(guard, test.x[:ATTACK_IMAGES], test.y[:ATTACK_IMAGES])
    ids = [*adv, *(f"honest-{k}" for k in range(HONEST_CLIENTS)),
           *(f"load-{k}" for k in range(LOAD_CLIENTS))]
    keys.update({f"{name}-key-{'x' * 16}": Client(name) for name in ids})
    write_keys(args.guard_dir / KEYS, keys)
    key_of = {c.id: k for k, c in read_keys(args.guard_dir / KEYS).items()}
    state = args.guard_dir / "bench-clients.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    proc = start(args.guard_dir, args.port, state)
    try:
        attackers = {name: asyncio.run(until_denied(url, key_of[name], images))
                     for name, images in adv.items()}
        honest_result = asyncio.run(honest(url, [key_of[f"honest-{k}"]
                                                 for k in range(HONEST_CLIENTS)], test.x))
        load_result = asyncio.run(load(url, [key_of[f"load-{k}"] for k in range(LOAD_CLIENTS)],
                                       test.x))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = in_process(guard, test.x)
    load_result["in_process_images_per_s"] = local
    load_result["service_over_in_process"] = load_result["requests_per_s"] / local
    policy = Policy()
    result = {"guard": json.loads((args.guard_dir / "guard.json").read_text()),
              "policy": {"window": policy.window, "min_requests": policy.min_requests,
                         "flagged_limit": policy.flagged_limit, "cooldown_s": policy.cooldown_s},
              "attackers": attackers, "honest": honest_result, "load": load_result,
              "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    print(json.dumps(result, indent=2))
    save("guard", result)


if __name__ == "__main__":
    main()
