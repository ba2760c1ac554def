"""Honest look-alike traffic against the guard service, over HTTP: the clients a stateful defence
must keep serving while it watches for query-based attacks. Each kind is 100 clients (one API
key each) sending at once to one server with the default policy and query watch, so the
global index sees every client's queries:

* **distinct**: 100 different test digits each (10,000 in all);
* **augmented**: 5 copies of each of 20 digits, each shifted by up to 2 px, brightness ± 0.1
  and noise σ 0.02;
* **fixed-camera**: 100 frames of one scene (a digit) with fresh sensor noise σ 0.02;
* **jittering-camera**: the same with the frame shifted by up to 2 px each time;
* **retrying-app**: 50 digits, each sent twice (the retry identical);
* **burst**: 100 different digits in two 50-image requests.

Reported per kind: clients denied (the goal is 0 of 100), the attack-process detections per
query (the false-positive rate per similar-but-benign query; goal ≤ 1%), detections per
client, and the answers told flagged and the flips among them (a query the model gives another
class than an earlier one it is taken for or lies beside), with the flips of each client and
their rate's standard error over the clients (a camera's frames share one scene, so the
clients, not the queries, are the samples). The digits are test images
100 – 9,999 (the attack benchmarks use the first 100): client i sends the 100 digits from the
100i-th on (wrapping), so on MNIST client 99 resends 99 of the digits clients 0 and 1 sent
(users sending the same picture).

    python benchmarks/bench_honest.py --guard-dir runs/guard-mnist

``--fill reflect`` moves images with their edge mirrored instead of black (a photo's scene goes
on past its frame; a CIFAR-10 model trained on reflected crops has never seen black bars).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from common import hold, save, standard_error, start_server

from advguard.data import load_data
from advguard.serve import Guard, Policy, read_keys, write_keys
from advguard.serve.guard import KEYS, Client

CLIENTS = 100
SIGMA = 0.02  # sensor noise


def shift(x: torch.Tensor, gen: torch.Generator, most: int = 2,
          fill: str = "zeros") -> torch.Tensor:
    """``x`` moved by up to ``most`` pixels in each direction, the edge filled with zeros (a
    digit on its black ground) or, ``fill="reflect"``, with the image mirrored at its edge (a
    scene that goes on past the frame, as a photo's does: black bars are nothing a camera
    sends, and a model trained on reflected crops has never seen them)."""
    dy, dx = (int(v) for v in torch.randint(-most, most + 1, (2,), generator=gen))
    h, w = x.shape[-2:]
    if fill == "reflect":
        padded = F.pad(x, (most, most, most, most), mode="reflect")
        return padded[..., most - dy:most - dy + h, most - dx:most - dx + w]
    out = torch.zeros_like(x)
    out[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        x[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def noisy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (x + SIGMA * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def streams(x: torch.Tensor, kind: str, client: int,
            fill: str = "zeros") -> list[torch.Tensor]:
    """The requests (batches) one honest client of ``kind`` sends (``fill``: how a moved
    image's edge is filled, :func:`shift`)."""
    gen = torch.Generator().manual_seed(client)
    start = (100 * client) % (len(x) - 99)
    own = x[start:start + 100]
    if kind == "distinct":
        return [own[i:i + 1] for i in range(100)]
    if kind == "augmented":
        out = []
        for i in range(20):
            for _ in range(5):
                b = float(torch.empty(1).uniform_(-0.1, 0.1, generator=gen))
                out.append(noisy(shift(own[i:i + 1], gen, fill=fill) + b, gen))
        return out
    if kind == "fixed-camera":
        return [noisy(own[:1], gen) for _ in range(100)]
    if kind == "jittering-camera":
        return [noisy(shift(own[:1], gen, fill=fill), gen) for _ in range(100)]
    if kind == "retrying-app":
        return [own[i // 2:i // 2 + 1] for i in range(100)]
    if kind == "burst":
        return [own[:50], own[50:]]
    raise ValueError(kind)


KINDS = ("distinct", "augmented", "fixed-camera", "jittering-camera", "retrying-app", "burst")


def run(url: str, keys: list[str], make: Callable[[int], list[torch.Tensor]], admin: str,
        ids: list[str]) -> dict[str, Any]:
    http = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32))

    def one(i: int) -> tuple[int, int | None, int]:
        sent = flagged = 0
        for batch in make(i):
            r = http.post("/v1/predict", json={"images": batch.tolist()},
                          headers={"X-API-Key": keys[i]})
            if r.status_code == 403:
                return sent, sent, flagged
            r.raise_for_status()
            sent += len(batch)
            flagged += sum(a["verdict"] == "flagged" for a in r.json()["results"])
        return sent, None, flagged

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(len(keys))))
    seen = {c["client"]: c for c in http.get("/v1/clients",
                                             headers={"X-API-Key": admin}).json()}
    http.close()
    detections = [int(seen[c]["recent_repeats"]) for c in ids]
    flips = [int(seen[c]["recent_flips"]) for c in ids]
    queries = sum(n for n, _, _ in outcomes)
    denied = [d for _, d, _ in outcomes if d is not None]
    # a client's queries are not independent (a camera's frames share one scene): the
    # standard error of the flip rate takes the clients as the samples
    se = standard_error([f / max(1, n) for f, (n, _, _) in zip(flips, outcomes, strict=True)])
    return {"clients": len(keys), "queries": queries, "denied": len(denied),
            "denied_after_queries": sorted(denied),
            "detections": sum(detections),
            "detections_per_query": sum(detections) / max(1, queries),
            "clients_with_a_detection": sum(d > 0 for d in detections),
            "linked_clients": sum(bool(seen[c]["linked"]) for c in ids),
            # answers told flagged (the detector's, and the watch's: a flip), and the flips:
            # queries given another class than an earlier one they were taken for or lay beside
            "flagged_answers_per_query": sum(f for _, _, f in outcomes) / max(1, queries),
            "flips": sum(flips), "flips_per_query": sum(flips) / max(1, queries),
            "clients_with_a_flip": sum(f > 0 for f in flips),
            "flips_per_query_se": se, "flips_by_client": flips,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="train: validation traffic, for choosing the watch's settings")
    parser.add_argument("--first", type=int, default=100, help="the first image sent")
    parser.add_argument("--fill", default="zeros", choices=("zeros", "reflect"),
                        help="how a moved image's edge is filled (reflect: a scene that goes "
                             "on past the frame)")
    parser.add_argument("--out", default="honest")
    parser.add_argument("--port", type=int, default=8732)
    args = parser.parse_args()
    hold(args.guard_dir)  # one benchmark at a time on a guard folder
    guard = Guard.load(args.guard_dir)
    test = load_data(guard.config.dataset, args.split, data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(args.first, min(len(test), args.first + 9900))])
    results: dict[str, Any] = {}
    for kind in args.kinds.split(","):
        ids = [f"honest-{kind}-{i}" for i in range(CLIENTS)]
        keys = read_keys(args.guard_dir / KEYS)
        keys.update({f"{c}-key-{'x' * 16}": Client(c) for c in ids})
        write_keys(args.guard_dir / KEYS, keys)
        key_of = {c.id: k for k, c in keys.items()}
        admin = next(k for k, c in keys.items() if c.admin)
        proc = start_server(args.guard_dir, args.port, args.guard_dir / "honest-clients.db")
        try:
            results[kind] = run(f"http://127.0.0.1:{args.port}", [key_of[c] for c in ids],
                                lambda i, kind=kind: streams(x, kind, i, args.fill), admin, ids)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(kind, json.dumps(results[kind]), flush=True)
        save(args.out, {"guard": json.loads((args.guard_dir / "guard.json").read_text()),
                        "policy": Policy().to_json(), "fill": args.fill,
                        "images": (f"{guard.config.dataset} {args.split} images {args.first}"
                                   f" - {args.first + len(x) - 1}"),
                        "runs": results}, args.guard_dir)


if __name__ == "__main__":
    main()
