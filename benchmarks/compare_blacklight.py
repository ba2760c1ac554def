"""Blacklight (Li et al., USENIX Security 2022) beside advguard's query watch, offline, on the
very same query streams: which attacks each detects, how soon, and how many honest queries it
takes for an attack's.

**Blacklight** as its paper and the OARS authors' configuration define it (no setting chosen
here): every pixel quantised to multiples of 50 (of 255), the flattened image cut into every
window of 20 consecutive values (step 1), each window hashed (SHA-256, with a salt), the 50
largest distinct hashes kept; a query is *detected* when it shares at least 25 of its 50
hashes with one query already stored — one store over every account.

**The query watch**: the guard folder's calibrated watch run as the service runs it (a SQLite
store, the per-key history and the global index), under a policy that denies nobody, so every
stream is seen whole; a query is detected when the watch counts it as an attack-process
detection (near-copies of the very same image sent again are answered as before and are no
detection, for either kind of traffic).

The streams: the harness's attackers (`bench_blackbox.py`: Square, SimBA, HopSkipJump; Square
blinded by noise up to ε, by shifts of up to 2 px, by crops of up to 2 px resized back) run
in-process against the unguarded model (the stream an attacker sends before any defence
answers it, as Blacklight's paper measures), each image its own account, and the honest
clients of `bench_honest.py` (100 clients of each kind, all in one store).

    python benchmarks/compare_blacklight.py --guard-dir runs/guard-mnist-eps --images 100
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_blackbox import Spent, Target, hopskipjump, simba, square
from bench_honest import CLIENTS, KINDS, streams
from common import save

from advguard.data import load_data
from advguard.serve import Guard, Policy
from advguard.serve.queries import encode
from advguard.serve.state import kept
from advguard.serve.stores import SQLiteStore

ROUND, WINDOW, KEEP, MATCH = 50, 20, 50, 25  # Blacklight's settings (OARS's configs)
SALT = b"advguard-blacklight-comparison"
QUIET = Policy(max_repeats=0, max_flips=0, max_flagged=0, flagged_limit=0)


def blacklight_digest(x: torch.Tensor) -> list[bytes]:
    """The 50 largest distinct SHA-256 hashes of the quantised image's windows of 20 values."""
    pixels = np.floor(x.detach().cpu().numpy().ravel() * 255 / ROUND).astype(np.uint8) * ROUND
    windows = np.lib.stride_tricks.sliding_window_view(pixels, WINDOW)
    hashes = {hashlib.sha256(SALT + w.tobytes()).digest() for w in windows}
    return sorted(hashes, reverse=True)[:KEEP]


class Blacklight:
    """One store over every account: hash → the stored queries holding it."""

    def __init__(self) -> None:
        self.index: dict[bytes, list[int]] = defaultdict(list)
        self.stored = 0

    def query(self, x: torch.Tensor) -> bool:
        digest = blacklight_digest(x)
        shared = Counter(i for h in digest for i in self.index.get(h, ()))
        hit = bool(shared) and max(shared.values()) >= MATCH
        for h in digest:
            self.index[h].append(self.stored)
        self.stored += 1
        return hit


class Watch:
    """The guard's query watch in a SQLite store of its own, denying nobody."""

    def __init__(self, guard: Guard, folder: Path) -> None:
        watch = guard.config.watch()
        assert watch is not None, "the guard folder has no calibrated query watch"
        self.store = SQLiteStore(folder / "compare.db", QUIET, watch)
        self.now = 0.0

    def query(self, client: str, x: torch.Tensor) -> bool:
        self.now += 0.001
        a = self.store.admit(client, [False], [1.0], encode(x[None]), self.now,
                             [kept({"class": 0}, 0)])
        return bool(a.repeats[0])


class Recorded(Target):
    """An attacked image whose queries the unguarded model answers in-process; every query
    sent is recorded (moved ones as sent)."""

    def __init__(self, guard: Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(None, ["local"], *args, **kwargs)  # type: ignore[arg-type]
        self.guard, self.sent = guard, []  # type: ignore[var-annotated]

    def _post(self, images: torch.Tensor) -> list[dict[str, Any]]:
        self.sent.extend(images)
        v = self.guard.verdicts(images)
        return [{"class": int(c), "probabilities": p.tolist(), "verdict": "trusted"}
                for c, p in zip(v.predicted, v.probabilities, strict=True)]


ATTACKS = {  # row: (attack, queries per request, budget, Target options)
    "square": (square, 1, 100, {}),
    "square/blinded-eps": (square, 1, 100, {"blind": None}),
    "square/shift-2": (square, 1, 100, {"shift": 2}),
    "square/crop-2": (square, 1, 100, {"crop": 2}),
    "simba": (simba, 1, 100, {}),
    "hopskipjump": (hopskipjump, 64, 400, {}),
}


def attack_streams(guard: Guard, x: torch.Tensor, y: torch.Tensor, eps: float,
                   name: str) -> list[list[torch.Tensor]]:
    fn, per_request, budget, options = ATTACKS[name]
    options = {k: (eps if v is None else v) for k, v in options.items()}
    out = []
    for i in range(len(x)):
        t = Recorded(guard, x[i], int(y[i]), eps, budget, guard.info.num_classes, per_request,
                     seed=i, **options)
        try:
            simba(t, 0.2) if fn is simba else fn(t)
        except Spent:
            pass
        out.append(t.sent)
    return out


def first_hits(hits: list[list[bool]]) -> dict[str, Any]:
    firsts = [h.index(True) + 1 for h in hits if True in h]
    return {"streams": len(hits), "queries": sum(len(h) for h in hits),
            "detected_streams": len(firsts),
            "median_first_detection": statistics.median(firsts) if firsts else None,
            "queries_detected": sum(sum(h) for h in hits)}


def compare_attacks(guard: Guard, x: torch.Tensor, y: torch.Tensor, eps: float,
                    folder: Path) -> dict[str, Any]:
    rows = {}
    for name in ATTACKS:
        t0 = time.perf_counter()
        sent = attack_streams(guard, x, y, eps, name)
        watch = Watch(guard, folder / name.replace("/", "-"))
        ours = [[watch.query(f"{name}-{i}", q) for q in s] for i, s in enumerate(sent)]
        theirs = []
        for s in sent:  # each attack alone on the service, as the paper measures
            store = Blacklight()
            theirs.append([store.query(q) for q in s])
        rows[name] = {"blacklight": first_hits(theirs), "watch": first_hits(ours),
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(name, rows[name], flush=True)
    return rows


def compare_honest(guard: Guard, x: torch.Tensor, folder: Path) -> dict[str, Any]:
    rows = {}
    for kind in KINDS:
        watch, store = Watch(guard, folder / kind), Blacklight()
        ours, theirs = [0] * CLIENTS, [0] * CLIENTS
        sent = [[im for batch in streams(x, kind, c) for im in batch] for c in range(CLIENTS)]
        for step in range(max(len(s) for s in sent)):  # the clients take turns
            for c in range(CLIENTS):
                if step < len(sent[c]):
                    ours[c] += watch.query(f"{kind}-{c}", sent[c][step])
                    theirs[c] += store.query(sent[c][step])
        n = sum(len(s) for s in sent)
        rows[kind] = {side: {"queries": n, "detections": sum(d),
                             "per_query": sum(d) / n, "clients_with_one": sum(v > 0 for v in d)}
                      for side, d in (("blacklight", theirs), ("watch", ours))}
        print(kind, rows[kind], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist-eps"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--out", default="blacklight-comparison")
    args = parser.parse_args()
    guard = Guard.load(args.guard_dir)
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(args.images)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for sub in [*ATTACKS, *KINDS]:
            (folder / sub.replace("/", "-")).mkdir()
        attacks = compare_attacks(guard, x[:args.images], y, args.eps, folder)
        honest = compare_honest(guard, x[100:], folder)
    save(args.out, {"guard": guard.config.queries, "eps": args.eps, "images": args.images,
                    "blacklight": {"round": ROUND, "window": WINDOW, "keep": KEEP,
                                   "match": MATCH},
                    "attacks": attacks, "honest": honest}, args.guard_dir)


if __name__ == "__main__":
    main()
