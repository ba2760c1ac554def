"""The guard service over HTTP on loopback, with the default policy and the query watch on (the
guard folder of ``advguard guard fit``):

1. white-box attackers — FGSM at ε = 0.1 / 0.2 / 0.3, PGD-20 at ε = 0.2 / 0.3 and the adaptive
   attacker of the guard's detector (targeted PGD on its ``adaptive_loss``: for the kNN
   detector, the pull of the whitened features onto the target class), each sending attacked
   test digits one per request: how many are answered before the client is denied;
2. dilution — PGD-20 (ε = 0.3) images, each followed by k clean test images from the same key
   (k = 0 … 10): denied or not, after how many requests and adversarial answers;
3. the race — ten 64-image PGD requests sent at once: adversarial images answered before the
   denial;
4. honest clients — the 10,000 clean test images sent by 100 clients (100 each), and 100 clients
   that send near-duplicates of their own images (20 images × 5 augmented copies: shifts,
   crops, noise, brightness, and flips where the data allows): clients wrongly denied, and the
   false-alarm rate per query of the query watch;
5. load — 2,000 requests of one image from 8 concurrent clients: requests/s, p50/p99 latency,
   and the ratio to calling model + detector in-process one image at a time; the memory of a
   full query history per client.

    python benchmarks/bench_guard.py --guard-dir runs/guard-mnist
    python benchmarks/bench_guard.py --guard-dir runs/guard-cifar10 --data-dir DIR \
        --out guard-cifar10 --fgsm 2/255,4/255,8/255 --pgd 4/255,8/255 --adaptive-eps 8/255

(the strengths above are MNIST's defaults; ``--fgsm``, ``--pgd`` and ``--adaptive-eps`` set
them for other data)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from common import hold, redis_server, save, start_server

from advguard.attacks import FGSM, PGD, random_targets
from advguard.data import load_data
from advguard.options import strength
from advguard.serve import Guard, Policy, read_keys, write_keys
from advguard.serve.guard import KEYS, Client

ATTACK_IMAGES = 200
HONEST_CLIENTS, HONEST_EACH = 100, 100
DUP_IMAGES, DUP_COPIES = 20, 5
DILUTION = (0, 1, 2, 3, 5, 10)
LOAD_REQUESTS, LOAD_CLIENTS = 2000, 8


def attacks(guard: Guard, x: torch.Tensor, y: torch.Tensor, classes: int,
            adaptive_weight: float = 1.0, surrogate: str | None = None, *,
            fgsm: tuple[str, ...] = ("0.1", "0.2", "0.3"), pgd: tuple[str, ...] = ("0.2", "0.3"),
            adaptive: str = "0.2") -> dict[str, torch.Tensor]:
    """The white-box attackers' images, named by attack and strength as given (``8/255``
    stays ``8/255``); the last PGD strength is the one the dilution and race use."""
    model = guard.model
    out = {f"fgsm-{e}": FGSM()(model, x, y, strength(e)) for e in fgsm}
    for e in pgd:
        out[f"pgd20-{e}"] = PGD(steps=20, seed=0)(model, x, y, strength(e))
    # the guard's detector's own attack
    pull = guard.detector.adaptive_loss(adaptive_weight, surrogate)
    target = random_targets(y, classes, 0)
    out[f"adaptive-{adaptive}"] = PGD(steps=20, random_start=False, loss=pull, targeted=True)(
        model, x, target, strength(adaptive))
    return out


def augmented(x: torch.Tensor, copies: int, flips: bool, seed: int) -> torch.Tensor:
    """``copies`` augmented versions of each image, as a camera or a retrying app sends them:
    a shift of up to 2 pixels, a crop of up to 2 pixels a side resized back, brightness ×
    0.7–1.3, Gaussian noise of σ 0.03, and (where the data allows) a left-right flip."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    side = x.shape[-1]
    for image in x:
        for _ in range(copies):
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            c = torch.roll(image[None], (dy, dx), (2, 3))
            m = int(torch.randint(0, 3, (1,), generator=gen))
            if m:
                c = torch.nn.functional.interpolate(c[..., m:side - m, m:side - m], size=side,
                                                    mode="bilinear", align_corners=False)
            c = c * (0.7 + 0.6 * torch.rand(1, generator=gen))
            c = c + 0.03 * torch.randn(c.shape, generator=gen)
            if flips and bool(torch.rand(1, generator=gen) < 0.5):
                c = c.flip(-1)
            out.append(c.clamp(0, 1))
    return torch.cat(out)


async def send(client: httpx.AsyncClient, key: str, images: torch.Tensor) -> httpx.Response:
    return await client.post("/v1/predict", json={"images": images.tolist()},
                             headers={"X-API-Key": key})


async def until_denied(url: str, key: str, images: torch.Tensor) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        flagged = 0
        for i, image in enumerate(images):
            r = await send(c, key, image)
            if r.status_code == 403:
                return {"answered_before_denial": i, "flagged_while_answered": flagged,
                        "reason": r.json()["detail"].split(": ", 1)[1]}
            r.raise_for_status()
            flagged += r.json()["results"][0]["verdict"] == "flagged"
    return {"answered_before_denial": None, "flagged_while_answered": flagged}


async def diluted(url: str, key: str, adv: torch.Tensor, clean: torch.Tensor, k: int,
                  requests: int = 600) -> dict[str, Any]:
    """One adversarial image, then ``k`` clean ones, one per request, until denied or
    ``requests`` requests."""
    answered = flagged_adv = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for n in range(requests):
            adversarial = n % (k + 1) == 0
            image = adv[(n // (k + 1)) % len(adv)] if adversarial else clean[n % len(clean)]
            r = await send(c, key, image)
            if r.status_code == 403:
                return {"k": k, "denied_at_request": n, "adversarial_answered": answered,
                        "adversarial_answered_flagged": flagged_adv,
                        "adversarial_answered_trusted": answered - flagged_adv,
                        "reason": r.json()["detail"].split(": ", 1)[1]}
            r.raise_for_status()
            if adversarial:
                answered += 1
                flagged_adv += r.json()["results"][0]["verdict"] == "flagged"
    return {"k": k, "denied_at_request": None, "adversarial_answered": answered,
            "adversarial_answered_flagged": flagged_adv,
            "adversarial_answered_trusted": answered - flagged_adv, "requests": requests}


async def race(url: str, key: str, adv: torch.Tensor, requests: int = 10,
               batch: int = 64) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        answers = await asyncio.gather(*(
            send(c, key, adv[torch.arange(i * batch, (i + 1) * batch) % len(adv)])
            for i in range(requests)))
    ok = [r for r in answers if r.status_code == 200]
    flagged = sum(t["verdict"] == "flagged" for r in ok for t in r.json()["results"])
    return {"requests": requests, "images_per_request": batch, "answered_requests": len(ok),
            "adversarial_images_answered": sum(len(r.json()["results"]) for r in ok),
            "flagged_images_answered": flagged,
            "statuses": sorted(r.status_code for r in answers)}


async def clients(url: str, keys: list[str], streams: list[torch.Tensor]) -> dict[str, Any]:
    """Client k sends ``streams[k]`` one image per request; 16 clients at a time."""
    async def one(k: int, c: httpx.AsyncClient) -> tuple[int, int, int]:
        flagged = denied = repeats = 0
        for image in streams[k]:
            r = await send(c, keys[k], image)
            if r.status_code == 403:
                denied = 1
                break
            r.raise_for_status()
            flagged += r.json()["results"][0]["verdict"] == "flagged"
            repeats = r.json()["status"]["recent_repeats"]
        return flagged, denied, repeats

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=16)) as c:
        sem = asyncio.Semaphore(16)

        async def limited(k: int) -> tuple[int, int, int]:
            async with sem:
                return await one(k, c)

        results = await asyncio.gather(*(limited(k) for k in range(len(keys))))
    images = sum(len(s) for s in streams)
    return {"clients": len(keys), "images": images,
            "flagged_share": sum(f for f, _, _ in results) / images,
            "clients_denied": sum(d for _, d, _ in results),
            "query_watch_detections": sum(r for _, _, r in results),
            "false_alarms_per_query": sum(r for _, _, r in results) / images}


async def _raw_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> tuple[int, bool]:
    """Send one pre-encoded HTTP/1.1 request on a kept-alive connection; the answer's status
    (its body read by its Content-Length and dropped) and whether the server closes the
    connection after it (``Connection: close``: 408, 413, 429, 431 do)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, close = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if length is None:
        raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
    await reader.readexactly(length)
    return status, close


def predict_requests(host: str, keys: list[str], images: torch.Tensor,
                     clients: int) -> list[list[bytes]]:
    """Each load client's requests, encoded before the clock starts: client k sends images
    k, k + clients, … (one image a request, JSON as `send` posts it)."""
    out: list[list[bytes]] = [[] for _ in range(clients)]
    for i, image in enumerate(images):
        k = i % clients
        body = json.dumps({"images": image[None].tolist()}, separators=(",", ":")).encode()
        out[k].append(b"POST /v1/predict HTTP/1.1\r\nHost: " + host.encode()
                      + b"\r\nX-API-Key: " + keys[k].encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and every live descendant (a service's
    workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for p, (parent, _) in stats.items():
            if parent in tree and p not in tree:
                tree.add(p)
                grew = True
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


async def load(url: str, keys: list[str], x: torch.Tensor, *, generator: str = "raw",
               clients: int = LOAD_CLIENTS, server_pid: int | None = None) -> dict[str, Any]:
    """``LOAD_REQUESTS`` one-image requests from ``clients`` concurrent clients, each on one
    kept-alive connection. ``generator="raw"`` sends requests encoded before the clock starts
    over asyncio streams (the load generator shares the machine's cores with the service, and
    its own CPU time a request is measured and reported); ``"httpx"`` encodes each request
    and posts it with httpx, as the benchmark did first."""
    if generator not in ("raw", "httpx"):
        raise ValueError(f"unknown load generator {generator!r}: raw or httpx")
    latencies: list[float] = []
    errors = 0
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = predict_requests(host, keys, x[torch.arange(LOAD_REQUESTS) % len(x)],
                                clients) if generator == "raw" else []

    async def raw(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for request in requests[k]:
                t0 = time.perf_counter()
                status, close = await asyncio.wait_for(_raw_post(reader, writer, request), 60)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
                if close:  # the server ends the connection after this answer: a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    async def with_httpx(k: int, c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in range(k, LOAD_REQUESTS, clients):
            t0 = time.perf_counter()
            r = await send(c, keys[k], x[i % len(x)])
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=clients)) as c:
        await send(c, keys[0], x[0])  # warm-up
        cpu0, server0 = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0
        t0 = time.perf_counter()
        if generator == "raw":
            await asyncio.gather(*(raw(k) for k in range(clients)))
        else:
            await asyncio.gather(*(with_httpx(k, c) for k in range(clients)))
        wall = time.perf_counter() - t0
        generator_cpu = time.process_time() - cpu0
        server_cpu = cpu_seconds(server_pid) - server0 if server_pid else None
    lat = sorted(latencies)
    out = {"requests": LOAD_REQUESTS, "concurrent_clients": clients, "generator": generator,
           "errors": errors, "requests_per_s": LOAD_REQUESTS / wall,
           "p50_ms": 1000 * statistics.median(lat),
           "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
           "generator_cpu_ms_per_request": 1000 * generator_cpu / LOAD_REQUESTS}
    if server_cpu is not None:
        out["server_cpu_ms_per_request"] = 1000 * server_cpu / LOAD_REQUESTS
    return out


def in_process(guard: Guard, x: torch.Tensor) -> float:
    guard.verdicts(x[:1])
    t0 = time.perf_counter()
    for i in range(LOAD_REQUESTS):
        guard.verdicts(x[i % len(x)][None])
    return LOAD_REQUESTS / (time.perf_counter() - t0)


def history_memory(guard: Guard, x: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Bytes a client's full query history takes: in SQLite (file growth for one client
    sending ``query_history`` distinct images) and as raw codes."""
    from advguard.serve.queries import encode
    from advguard.serve.stores import SQLiteStore

    watch = guard.config.watch()
    assert watch is not None
    path = folder / "bench-memory.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    policy = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    store = SQLiteStore(path, policy, watch)
    store.admit("empty", [False], [1.0], encode(x[:1]), now=0)
    store._connect().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.stat().st_size
    n = watch.query_history
    for i in range(0, n, 50):
        part = x[i:i + 50]
        store.admit("full", [False] * len(part), [1.0] * len(part), encode(part), now=1)
    store._connect().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    grown = path.stat().st_size - before
    store.close()
    code = encode(x[:1]).nbytes
    out: dict[str, Any] = {"queries_per_client": n, "code_bytes": code,
                           "raw_codes_bytes": n * code, "sqlite_bytes": grown}
    if shutil.which("redis-server") is not None:  # MEMORY USAGE of one client's full history
        from advguard.serve.stores import RedisStore

        with redis_server(6391) as url:
            rs = RedisStore(url, policy, watch)
            for i in range(0, n, 50):
                part = x[i:i + 50]
                rs.admit("full", [False] * len(part), [1.0] * len(part), encode(part), now=1)
            out["redis_bytes"] = rs.redis.memory_usage("advguard:queries:full")
            rs.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--data-dir", default=None, help="where a named dataset lies")
    parser.add_argument("--out", default="guard")
    parser.add_argument("--port", type=int, default=8711)
    parser.add_argument("--fgsm", default="0.1,0.2,0.3", help="FGSM attackers' strengths")
    parser.add_argument("--pgd", default="0.2,0.3",
                        help="PGD-20 attackers' strengths; the last is the dilution's and race's")
    parser.add_argument("--adaptive-eps", default="0.2", help="the adaptive attacker's strength")
    parser.add_argument("--adaptive-weight", type=float, default=1.0,
                        help="the detector term's weight in the adaptive attack (choose it as "
                             "reproduce detect does, on validation images)")
    parser.add_argument("--adaptive-surrogate", default=None,
                        help="which of the detector's surrogates the adaptive attack descends "
                             "(default: the detector's first; see Detector.surrogates)")
    args = parser.parse_args()
    hold(args.guard_dir)  # one benchmark at a time on a guard folder
    guard = Guard.load(args.guard_dir)
    info = guard.info
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    adv = attacks(guard, x[:ATTACK_IMAGES], y[:ATTACK_IMAGES], info.num_classes,
                  args.adaptive_weight, args.adaptive_surrogate,
                  fgsm=tuple(args.fgsm.split(",")), pgd=tuple(args.pgd.split(",")),
                  adaptive=args.adaptive_eps)
    pgd = adv[f"pgd20-{args.pgd.split(',')[-1]}"]
    dup = [augmented(x[k * DUP_IMAGES:(k + 1) * DUP_IMAGES], DUP_COPIES, info.flips, k)
           for k in range(HONEST_CLIENTS)]
    ids = [*adv, *(f"dilution-{k}" for k in DILUTION), "race",
           *(f"honest-{k}" for k in range(HONEST_CLIENTS)),
           *(f"dup-{k}" for k in range(HONEST_CLIENTS)),
           *(f"load-{k}" for k in range(LOAD_CLIENTS))]
    keys = read_keys(args.guard_dir / KEYS)  # added to, so other benchmarks' keys stay
    keys.update({f"{name}-key-{'x' * 16}": Client(name) for name in ids})
    write_keys(args.guard_dir / KEYS, keys)
    key_of = {c.id: k for k, c in read_keys(args.guard_dir / KEYS).items()}
    url = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.guard_dir, args.port, args.guard_dir / "bench-clients.db")
    try:
        attackers = {name: asyncio.run(until_denied(url, key_of[name], images))
                     for name, images in adv.items()}
        dilution = [asyncio.run(diluted(url, key_of[f"dilution-{k}"], pgd, x[5000:], k))
                    for k in DILUTION]
        raced = asyncio.run(race(url, key_of["race"], pgd))
        honest = asyncio.run(clients(url, [key_of[f"honest-{k}"] for k in range(HONEST_CLIENTS)],
                                     [x[k::HONEST_CLIENTS] for k in range(HONEST_CLIENTS)]))
        near = asyncio.run(clients(url, [key_of[f"dup-{k}"] for k in range(HONEST_CLIENTS)], dup))
        loaded = asyncio.run(load(url, [key_of[f"load-{k}"] for k in range(LOAD_CLIENTS)], x))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = in_process(guard, x)
    loaded["in_process_images_per_s"] = local
    loaded["service_over_in_process"] = loaded["requests_per_s"] / local
    result = {"guard": json.loads((args.guard_dir / "guard.json").read_text()),
              "policy": Policy().to_json(), "adaptive_weight": args.adaptive_weight,
              "adaptive_surrogate": args.adaptive_surrogate
              or guard.detector.surrogates[0],
              "attackers": attackers, "dilution": dilution,
              "race": raced, "honest": honest, "honest_near_duplicates": near, "load": loaded,
              "history_memory": history_memory(guard, x, args.guard_dir),
              "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    print(json.dumps(result, indent=2))
    save(args.out, result)


if __name__ == "__main__":
    main()
