"""Blacklight (Li et al., USENIX Security 2022) and PIHA (Choi et al., Computers & Security
2023) beside advguard's query watch, offline, on the very same query streams: which attacks
each detects, how soon, and how many honest queries it takes for an attack's.

**Blacklight** as its paper and the OARS authors' configuration define it (no setting chosen
here): every pixel quantised to multiples of 50 (of 255), the flattened image cut into every
window of 20 consecutive values (step 1), each window hashed (SHA-256, with a salt), the 50
largest distinct hashes kept; a query is *detected* when it shares at least 25 of its 50
hashes with one query already stored — one store over every account.

**PIHA** as the OARS authors' code configures it for CIFAR-10 (no setting chosen here): the
image blurred (3 × 3 Gaussian, σ 1, OpenCV's default border), its hue (HSV, degrees) cut into
blocks of 7 × 7 (the image padded with zeros on the right and bottom by 7 − side mod 7), each
block summed, and the local binary pattern (8 neighbours at radius 1, interpolated, zero
outside) of that block-sum matrix is the hash; a query is *detected* when its nearest stored
hash differs in at most 5% of its entries and is not the black image's hash OARS begins its
store with. A grey image has no hue (every hash alike): on MNIST the grey value takes the
hue's place, the one change made. Computed with OpenCV and scikit-image (``cv2.GaussianBlur``,
``cv2.cvtColor``, ``skimage.feature.local_binary_pattern``: ``pip install -e ".[bench]"``), as
the OARS code computes it.

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
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
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


PIHA_BLOCK, PIHA_THRESHOLD = 7, 0.05  # OARS's configs for PIHA on CIFAR-10


def piha_hash(x: torch.Tensor) -> np.ndarray:
    """PIHA's hash of one image (C, H, W) in [0, 1]: the local binary pattern of the block
    sums of its blurred hue (a grey image: of its grey value), computed by OpenCV and
    scikit-image as the OARS authors compute it."""
    import cv2
    from skimage.feature import local_binary_pattern

    a = cv2.GaussianBlur(x.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32),
                         (3, 3), 1)
    plane = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)[:, :, 0] if a.ndim == 3 else a
    pad = PIHA_BLOCK - plane.shape[0] % PIHA_BLOCK
    plane = np.pad(plane, ((0, pad), (0, pad)))
    steps = range(0, plane.shape[0], PIHA_BLOCK)
    sums = np.array([[plane[i:i + PIHA_BLOCK, j:j + PIHA_BLOCK].sum() for j in steps]
                     for i in steps])
    with warnings.catch_warnings():  # it warns that float ties are fragile; PIHA's own way
        warnings.simplefilter("ignore", UserWarning)
        return local_binary_pattern(sums, 8, 1).ravel()


class PIHA:
    """One store of hashes over every account, begun as OARS begins it with the hash of a
    black image: a query is detected when its nearest hash differs in at most
    ``PIHA_THRESHOLD`` of its entries and is not that first one (OARS drops it from the
    nearest; a tie goes to it, the first row)."""

    def __init__(self, black: np.ndarray) -> None:
        self.stored = np.empty((1024, len(black)))
        self.stored[0] = black
        self.count = 1

    def query(self, x: torch.Tensor) -> bool:
        h = piha_hash(x)
        distance = (self.stored[:self.count] != h).mean(1)
        nearest = int(distance.argmin())
        hit = nearest != 0 and bool(distance[nearest] <= PIHA_THRESHOLD)
        if self.count == len(self.stored):
            self.stored = np.concatenate([self.stored, np.empty_like(self.stored)])
        self.stored[self.count] = h
        self.count += 1
        return hit


def baselines(shape: tuple[int, ...]) -> dict[str, Callable[[], Blacklight | PIHA]]:
    """A fresh store of each baseline, for images of ``shape``."""
    black = piha_hash(torch.zeros(shape))
    return {"blacklight": Blacklight, "piha": lambda: PIHA(black)}


class Watch:
    """The guard's query watch in a SQLite store of its own, denying nobody."""

    def __init__(self, guard: Guard, folder: Path) -> None:
        watch = guard.config.watch()
        assert watch is not None, "the guard folder has no calibrated query watch"
        self.store = SQLiteStore(folder / "compare.db", QUIET, watch)
        self.now, self.watch = 0.0, watch

    def codes(self, images: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Each image's query code and, for a pooled (colour) view, its moved windows (the
        image's own, moved before it is pooled), as the service's inference thread computes
        them; in batches (each image's numbers are its own, whatever its batch)."""
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for i in range(0, len(images), 256):
            batch = torch.stack(images[i:i + 256])
            codes = encode(batch)
            moved = self.watch.windows(batch)
            out += [(codes[j:j + 1], None if moved is None else moved[j:j + 1])
                    for j in range(len(batch))]
        return out

    def query(self, client: str, code: tuple[np.ndarray, np.ndarray | None]) -> bool:
        self.now += 0.001
        a = self.store.admit(client, [False], [1.0], code[0], self.now,
                             [kept({"class": 0}, 0)], code[1])
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
                    folder: Path, names: list[str]) -> dict[str, Any]:
    rows = {}
    for name in names:
        t0 = time.perf_counter()
        sent = attack_streams(guard, x, y, eps, name)
        watch = Watch(guard, folder / name.replace("/", "-"))
        ours = [[watch.query(f"{name}-{i}", q) for q in watch.codes(s)]
                for i, s in enumerate(sent)]
        rows[name] = {"watch": first_hits(ours)}
        # each attack alone on a store of its own, as the papers measure it
        for side, store_kind in baselines(x.shape[1:]).items():
            hits = []
            for s in sent:
                store = store_kind()
                hits.append([store.query(q) for q in s])
            rows[name][side] = first_hits(hits)
        rows[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, rows[name], flush=True)
    return rows


def compare_honest(guard: Guard, x: torch.Tensor, folder: Path,
                   kinds: list[str]) -> dict[str, Any]:
    rows = {}
    for kind in kinds:
        watch = Watch(guard, folder / kind)
        stores = {side: store_kind() for side, store_kind in baselines(x.shape[1:]).items()}
        counts: dict[str, list[int]] = {side: [0] * CLIENTS for side in ("watch", *stores)}
        sent = [[im for batch in streams(x, kind, c) for im in batch] for c in range(CLIENTS)]
        codes = [watch.codes(s) for s in sent]
        for step in range(max(len(s) for s in sent)):  # the clients take turns
            for c in range(CLIENTS):
                if step < len(sent[c]):
                    counts["watch"][c] += watch.query(f"{kind}-{c}", codes[c][step])
                    for side, store in stores.items():
                        counts[side][c] += store.query(sent[c][step])
        n = sum(len(s) for s in sent)
        rows[kind] = {side: {"queries": n, "detections": sum(d),
                             "per_query": sum(d) / n, "clients_with_one": sum(v > 0 for v in d)}
                      for side, d in counts.items()}
        print(kind, rows[kind], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist-eps"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--out", default="blacklight-comparison")
    parser.add_argument("--only", default=None,
                        help="comma-separated attack rows and honest kinds to run (all if unset)")
    args = parser.parse_args()
    guard = Guard.load(args.guard_dir)
    test = load_data(guard.config.dataset, "test", data_dir=args.data_dir)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(args.images)])
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and only - {*ATTACKS, *KINDS}:
        parser.error(f"--only: unknown {sorted(only - {*ATTACKS, *KINDS})}; "
                     f"of {', '.join([*ATTACKS, *KINDS])}")
    try:
        baselines(x.shape[1:])  # PIHA's hash, before an hour of attacks
    except ImportError as exc:
        parser.error(f"PIHA needs OpenCV and scikit-image ({exc}): pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for sub in [*ATTACKS, *KINDS]:
            (folder / sub.replace("/", "-")).mkdir()
        attacks = compare_attacks(guard, x[:args.images], y, args.eps, folder,
                                  [n for n in ATTACKS if only is None or n in only])
        honest = compare_honest(guard, x[100:], folder,
                                [k for k in KINDS if only is None or k in only])
    save(args.out, {"guard": guard.config.queries, "eps": args.eps, "images": args.images,
                    "blacklight": {"round": ROUND, "window": WINDOW, "keep": KEEP,
                                   "match": MATCH},
                    "piha": {"block": PIHA_BLOCK, "threshold": PIHA_THRESHOLD},
                    "attacks": attacks, "honest": honest}, args.guard_dir)


if __name__ == "__main__":
    main()
