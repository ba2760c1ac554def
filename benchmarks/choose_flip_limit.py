"""How many flips deny a client (``Policy.max_flips``), chosen on validation traffic: the
streams of ``process_streams.py`` (MNIST *training* images, the last 3,000 of the training file;
none of the test images the guard benchmarks report) sent through the guard as the service
runs it — the guard folder's model, detector and calibrated query watch, a real SQLite store —
in-process, so that every attack meets the watch's answers (a near-copy answered as its
earlier query was) exactly as over HTTP.

Each stream runs once with no denial, every query's outcome recorded (detected, answered as
before, the model's class and the class answered, trusted, inside the ε-ball); then every
candidate limit is replayed on the records (the answers do not depend on the limit, only where
the stream would have ended): honest clients denied, attack streams denied, and attack streams
*fooled and trusted* before their denial (a wrong class inside the ε-ball answered trusted).
The chosen limit is the smallest that denies no honest stream.

    python benchmarks/choose_flip_limit.py --guard-dir runs/guard-mnist
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import save
from process_streams import ATTACKS, EPS, HONEST, honest_stream
from torch import nn

from advguard.data import load_dataset
from advguard.serve import Guard, Policy, SQLiteStore
from advguard.serve.queries import encode
from advguard.serve.reveal import summary
from advguard.serve.state import answer_class, kept, settled, shown

STREAMS = 10  # per attack and per honest kind
QUERIES = 100
LIMITS = (1, 2, 3, 4, 5, 8)


class Service(nn.Module):
    """The guard as a black box over one client's key: log-probabilities of the answers the
    service gives (a near-copy's are its earlier query's); every query's outcome recorded."""

    def __init__(self, guard: Guard, store: SQLiteStore, client: str, x0: torch.Tensor | None,
                 y: int | None) -> None:
        super().__init__()
        self.guard, self.store, self.client, self.x0, self.y = guard, store, client, x0, y
        self.rows: list[dict[str, Any]] = []
        self.now = 0.0

    def ask(self, x: torch.Tensor) -> list[dict[str, Any]]:
        v = self.guard.verdicts(x)
        fresh = [summary(v, i, self.guard.info.num_classes) for i in range(len(x))]
        answers = [kept(r, c) for r, c in zip(fresh, v.predicted, strict=True)]
        self.now += 1.0
        a = self.store.admit(self.client, (v.scores < v.threshold).tolist(), v.scores.tolist(),
                             encode(x), self.now, answers)
        before = list(a.as_before) or [False] * len(x)
        # as the service tells them (routes._predict): a replaced answer vouched for no more
        # than the query's own (a fresh flip's is told flagged already)
        given = [shown(k if g is None else settled(g, k))
                 for g, k in zip(a.answers, answers, strict=True)]
        for i, g in enumerate(given):
            inside = self.x0 is not None and float((x[i] - self.x0).abs().max()) <= EPS + 1e-5
            earlier = a.answers[i]
            self.rows.append({"detected": bool(a.repeats[i]), "as_before": before[i],
                              "model_class": int(v.predicted[i]), "answered": g["class"],
                              "flip": earlier is not None and (
                                  not before[i] or answer_class(earlier) != int(v.predicted[i])),
                              "trusted": g["verdict"] == "trusted", "inside": inside})
        return given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = self.ask(x.detach().cpu())
        return torch.tensor([g["probabilities"] for g in given]).clamp_min(1e-12).log()


def outcome(rows: list[dict[str, Any]], y: int | None, limit: int) -> dict[str, Any]:
    """A stream's outcome had ``limit`` flips denied it."""
    flips = np.cumsum([r["flip"] for r in rows])
    ended = int(np.searchsorted(flips, limit))  # the query that denies (it is not answered)
    answered = rows[:ended]
    fooled = [i for i, r in enumerate(answered) if y is not None and r["inside"]
              and r["answered"] is not None and r["answered"] != y]
    trusted = [i for i in fooled if answered[i]["trusted"]]
    return {"denied_at": ended if ended < len(rows) else None,
            "fooled_at": fooled[0] + 1 if fooled else None,
            "fooled_trusted_at": trusted[0] + 1 if trusted else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--out", default="flip-limit-choice")
    args = parser.parse_args()
    torch.manual_seed(0)
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    assert watch is not None, "fit the guard again: its query watch is of another encoding"
    train = load_dataset("mnist", "train")
    x, y = train.x[-3000:], train.y[-3000:]
    quiet = Policy(max_repeats=0, max_flips=0, max_flagged=0, flagged_limit=0)
    records: dict[str, list[tuple[list[dict[str, Any]], int | None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "clients.db", quiet, watch)
        for name, (fn, kw) in ATTACKS.items():
            records[name] = []
            for i in range(STREAMS):
                service = Service(guard, store, f"{name}-{i}", x[i], int(y[i]))
                fn(service, x[i], int(y[i]), QUERIES, seed=i, **kw)
                records[name].append((service.rows, int(y[i])))
            print(name, flush=True)
        for kind in HONEST:
            records[kind] = []
            for i in range(STREAMS):
                service = Service(guard, store, f"{kind}-{i}", None, None)
                stream = honest_stream(x[100 + 100 * i:], kind, QUERIES, seed=i)
                for j in range(len(stream)):
                    service.ask(stream[j:j + 1])
                records[kind].append((service.rows, None))
            print(kind, flush=True)
        store.close()
    table: dict[str, Any] = {}
    for name, streams in records.items():
        rows = [r for s, _ in streams for r in s]
        row: dict[str, Any] = {
            "queries": len(rows),
            "detected_per_query": float(np.mean([r["detected"] for r in rows])),
            "answered_as_before_per_query": float(np.mean([r["as_before"] for r in rows])),
            "flips": [int(sum(r["flip"] for r in s)) for s, _ in streams]}
        for limit in LIMITS:
            outs = [outcome(s, yy, limit) for s, yy in streams]
            row[f"limit-{limit}"] = {
                "denied": sum(o["denied_at"] is not None for o in outs),
                "fooled": sum(o["fooled_at"] is not None for o in outs),
                "fooled_and_trusted": sum(o["fooled_trusted_at"] is not None for o in outs)}
        table[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "flips"}), flush=True)
    honest_ok = [limit for limit in LIMITS
                 if all(table[k][f"limit-{limit}"]["denied"] == 0 for k in HONEST)]
    save(args.out, {"guard": str(args.guard_dir), "streams": STREAMS, "queries": QUERIES,
                    "eps": EPS, "images": "MNIST training images, the last 3,000",
                    "limits": LIMITS, "chosen": min(honest_ok) if honest_ok else None,
                    "table": table}, args.guard_dir)
    print("chosen", min(honest_ok) if honest_ok else None)


if __name__ == "__main__":
    main()
