"""An honest client's latency while six others send maximum-size bodies to the same guard.

The guard: a LeNet-5 (3 epochs on 8,000 real MNIST digits) with the default detector (k = 1000,
DW-kNN, PCA + whitening) over the full 55,000-image training split, served by ``advguard
serve`` with its default settings on loopback. The honest client sends one real test digit per
request (a PNG), 20 requests a second, one at a time, and records each latency. Scenarios, one
after another on the same server:

* ``alone`` — nobody else;
* ``json-at-limit`` — 6 clients, each sending JSON bodies of 64 valid images written with
  long numbers until the body is as large as the JSON limit lets it be (parsed, classified);
* ``json-over-limit`` — 6 clients sending 8 MiB JSON bodies (refused by their length);
* ``png-pixel-budget`` — 6 clients sending 64 PNG files of 1024x1024 (tiled noise, 4.7 MB in
  all) whose pixels fill the request's decode budget exactly (decoded, resized, classified);
* ``png-over-budget`` — 6 clients sending 64 PNGs of 4096x4096 in about 1 MiB (refused from
  their headers, nothing decoded).

Each attacking client has its own key and the default rate limit (50 requests/s per key).

    python benchmarks/bench_hostile_load.py
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import save
from PIL import Image

from advguard.data import load_dataset
from advguard.models import build_model, save_model
from advguard.serve import Client, fit_guard, read_keys, write_keys
from advguard.serve.guard import KEYS
from advguard.serve.inputs import json_limit
from advguard.serve.limits import Limits
from advguard.training import StrengthMix, TrainConfig, train

ATTACKERS = 6
HONEST_REQUESTS = 300
HONEST_EVERY_S = 0.05  # the honest client sends 20 requests/s, under its rate limit


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def make_guard(folder: Path) -> Path:
    data = load_dataset("mnist", "train", limit=8000)
    torch.manual_seed(0)
    model = build_model("lenet5", "mnist")
    train(model, data, StrengthMix(), None, TrainConfig(epochs=3, batch_size=64),
          progress=False)
    save_model(folder / "lenet.safetensors", model, arch="lenet5", dataset="mnist")
    fit_guard(folder / "lenet.safetensors", folder / "guard")
    return folder / "guard"


def bodies(limit: int, x: torch.Tensor) -> dict[str, tuple[dict[str, str], bytes]]:
    """What the attackers send, per scenario: (headers, body)."""
    # float32 pixels written as doubles ("0.30000001192092896"), then spaces up to the limit
    images = (x[:64] * 0.999 + 0.0005).numpy().astype(np.float64)
    text = json.dumps({"images": images.tolist()}).encode()
    at_limit = text[:-1] + b" " * max(0, limit - len(text)) + b"}"
    json_headers = {"content-type": "application/json"}
    # decode budget: 64 PNGs of 1024x1024 = 2^26 pixels (= max_request_pixels)
    rng = np.random.default_rng(0)
    side = int((Limits.max_request_pixels // 64) ** 0.5)
    tile = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # noise that deflate can pack:
    noisy = png(np.tile(tile, (side // 64, side // 64)))  # 73 KB a file, 4.7 MB for 64
    blank = png(np.zeros((4096, 4096), dtype=np.uint8))
    return {
        "json-at-limit": (json_headers, at_limit),
        "json-over-limit": (json_headers, b"0" * (8 * 2 ** 20)),
        "png-pixel-budget": _multipart([noisy] * 64),
        "png-over-budget": _multipart([blank] * 64),
    }


def _multipart(files: list[bytes]) -> tuple[dict[str, str], bytes]:
    boundary = "advguard-bench-boundary"
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
              f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data
             + b"\r\n" for i, data in enumerate(files)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


def attacker(url: str, key: str, headers: dict[str, str], body: bytes, stop: threading.Event,
             statuses: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            try:
                r = c.post("/v1/predict", content=body, headers={**headers, "X-API-Key": key})
                statuses.append(r.status_code)
            except httpx.TransportError:
                statuses.append(-1)


def honest(url: str, key: str, x: torch.Tensor) -> list[float]:
    files = [png(np.round(x[i, 0].numpy() * 255).astype(np.uint8)) for i in range(len(x))]
    latencies = []
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(HONEST_REQUESTS):
            time.sleep(max(0.0, start + i * HONEST_EVERY_S - time.perf_counter()))
            t0 = time.perf_counter()
            r = c.post("/v1/predict", headers={"X-API-Key": key},
                       files=[("files", ("d.png", files[i % len(files)], "image/png"))])
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guard-dir", type=Path, default=None,
                        help="a guard folder (default: fit one here, about a minute)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    guard_dir = args.guard_dir or make_guard(tmp)
    keys = read_keys(guard_dir / KEYS)
    keys.update({f"bench-attacker-{i}-0123456789": Client(f"attacker-{i}")
                 for i in range(ATTACKERS)})
    keys["bench-honest-0123456789abc"] = Client("honest")
    write_keys(guard_dir / KEYS, keys)
    test = load_dataset("mnist", "test", limit=200)
    port = 8700
    proc = subprocess.Popen([sys.executable, "-m", "advguard.cli", "serve", str(guard_dir),
                             "--port", str(port), "--state", f"sqlite:///{tmp}/bench.db",
                             "--cooldown", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        from advguard.serve.guard import Guard

        info = Guard.load(guard_dir).info
        limit = json_limit(info, Limits.max_batch, Limits.max_body_bytes)
        scenarios = {"alone": None, **bodies(limit, test.x)}
        results = {}
        for name, attack in scenarios.items():
            stop, statuses, threads = threading.Event(), [], []
            if attack is not None:
                for i in range(ATTACKERS):
                    t = threading.Thread(target=attacker, args=(
                        url, f"bench-attacker-{i}-0123456789", *attack, stop, statuses))
                    t.start()
                    threads.append(t)
                time.sleep(2)  # the attackers are in full flow
            lat = sorted(honest(url, "bench-honest-0123456789abc", test.x))
            stop.set()
            for t in threads:
                t.join()
            counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
            results[name] = {
                "honest_requests": len(lat), "p50_ms": 1000 * statistics.median(lat),
                "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1000 * lat[-1],
                "attacker_body_bytes": 0 if attack is None else len(attack[1]),
                "attacker_answers": counts}
            print(f"{name:18s} p50 {results[name]['p50_ms']:7.1f} ms  p99 "
                  f"{results[name]['p99_ms']:7.1f} ms  attackers got {counts}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    save("hostile_load", {"attackers": ATTACKERS, "json_limit_bytes": limit,
                          "max_request_pixels": Limits.max_request_pixels,
                          "scenarios": results})


if __name__ == "__main__":
    main()
