"""Query-based black-box attackers against the guard service, over HTTP only: they hold no
weights, only an API key and the answers.

* **Square** (score-based; torchattacks' implementation with the reference settings: margin
  loss, p_init 0.8, ``resc_schedule=False``) on the returned probabilities;
* **SimBA** (score-based; Guo et al. 2019, pixel basis): one pixel moved by ``--simba-step`` at
  a time, kept when the true class's probability falls;
* **HopSkipJump** (decision-based; ART's implementation, L∞, driven through an ART
  ``BlackBoxClassifier`` whose predictions are the service's labels, 64 queries a request);

and their adaptive variants on the guarded service (each also with its start unseen: the
image itself, an attack's first query, never sent — the attacker who knows that the watch
flags a query given another class than an earlier one beside it): **query blinding**
(uniform noise of ``--blind`` added to every query inside the ε-ball, as Chen et al. propose
against their own defence) and **dilution** (k clean test images sent by the same key after
every attack query, k = 1, 5, 10).

Each attacked test image has its own API key (so a denial ends the attack on that image only),
or — spread over keys (``--spread 3,10``) — its own 3 or 10 keys, taking turns one request each;
a denied key drops out and the attack goes on with the others until all are denied. Blinding
covers the whole image at ``--blind``, or half of it (a random rectangle, redrawn each query)
at ε: the strongest noise that stays inside the ball. The *adaptive* attacker (OARS, Feng et
al. 2023) reads the guard's answers as the oracle of its watch: an answer identical to one it
already had means its query was taken for a near-copy, and it raises its blinding noise
(×1.5, up to ε on the whole image) after each such answer and lowers it (×0.95) after a fresh
one.
Blinding by *moving* the image (``--moves shift-2,crop-2``): every query shifted by up to 2
pixels, or cropped by up to 2 pixels a side and resized back; such a query leaves the ε-ball,
so a wrong answer is *cashed in* by sending the unmoved candidate once, and the success is
judged on that answer. HopSkipJump also runs against ``--outputs label`` (``label-only``).
``--split train --first N`` attacks validation images (for choosing the watch's settings);
each row also counts its fooled-and-trusted images among those the model classifies right
before any attack.
An image is *fooled* when the service answers a query that lies within ε (L∞) of it with a
wrong class, and *evaded* when that answer is also trusted (not flagged by the detector): what
a guarded service's user relies on. The unguarded service never denies (no query watch, no flagged
rules); the guarded one runs the default policy. Both have the request and image rate limits
raised, so that what is measured is the guard, not the rate limit.

    python benchmarks/bench_blackbox.py --guard-dir runs/guard-mnist --images 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from common import RESULTS, hold, save, start_server
from torch import nn

from advguard.data import load_data
from advguard.serve import Guard, Policy, read_keys, write_keys
from advguard.serve.guard import KEYS, Client


class Denied(Exception):
    """The service refused the key: the attack on this image is over."""


class Spent(Exception):
    """The attack used its query budget."""


class Target:
    """One attacked image as the attacker meets it: queries go over HTTP under its own key;
    counts the queries answered, and notes the first answered success and the denial."""

    def __init__(self, http: httpx.Client, keys: list[str], x0: torch.Tensor, y: int,
                 eps: float, budget: int, classes: int, per_request: int = 1,
                 blind: float = 0.0, dilution: int = 0, clean: torch.Tensor | None = None,
                 seed: int = 0, blind_part: float = 1.0, adaptive: bool = False,
                 shift: int = 0, crop: int = 0, unseen_start: bool = False) -> None:
        self.http, self.keys, self.x0, self.y, self.eps = http, list(keys), x0, y, eps
        self.budget, self.classes, self.per_request = budget, classes, per_request
        self.blind, self.dilution, self.clean = blind, dilution, clean
        self.blind_part = blind_part  # the share of the image the blinding noise covers
        # blinding by moving the image: every query shifted by up to ``shift`` pixels (edges
        # repeated), or cropped by up to ``crop`` pixels a side and resized back, redrawn each
        # query; such a query is no longer within ε of the image, so a wrong answer is cashed
        # in by sending the unmoved candidate once: the success is judged on that answer, and
        # the attack is told that answer (a wrong class the move alone caused is no success)
        self.shift, self.crop = shift, crop
        self.turn = 0  # the keys take turns, one request each; a denied key drops out
        # OARS-style (Feng et al. 2023): the service's answers as the oracle of its watch — an
        # answer identical to one already had means the query was taken for a near-copy — and
        # the blinding noise raised after each such answer (up to ε), lowered after a fresh one
        self.adaptive = adaptive
        # the attacker who knows the watch flags a query that the model gives another class
        # than an earlier one inside its ball: it never sends the image itself (an attack's
        # first query), answering that query on its own with the class it knows
        self.unseen_start = unseen_start
        self.seen: set[tuple[float, ...]] = set()
        self.as_before = 0  # answers identical to an earlier one
        self.detected_at: int | None = None  # the first query the service counted as a repeat
        self.gen = torch.Generator().manual_seed(seed)
        self.queries = 0  # attack queries answered
        self.clean_sent = 0
        self.success_at: int | None = None  # fooled: a wrong class within ε
        self.evaded_at: int | None = None  # fooled and trusted
        self.denied_at: int | None = None

    def _post(self, images: torch.Tensor) -> list[dict[str, Any]]:
        while self.keys:
            key = self.keys[self.turn % len(self.keys)]
            self.turn += 1
            r = self.http.post("/v1/predict", json={"images": images.tolist()},
                               headers={"X-API-Key": key})
            if r.status_code != 403:
                r.raise_for_status()
                results: list[dict[str, Any]] = r.json()["results"]
                if self.detected_at is None and r.json()["status"].get("recent_repeats"):
                    self.detected_at = self.queries + len(results)
                return results
            self.keys.remove(key)  # denied: the attack goes on with the keys it has left
        raise Denied

    def _blinded(self, batch: torch.Tensor) -> torch.Tensor:
        """Fresh uniform noise of up to ``blind`` on a random rectangle covering
        ``blind_part`` of the image (all of it at 1), redrawn for every query and kept inside
        the ε-ball (Chen et al.'s query blinding)."""
        noise = (torch.rand(batch.shape, generator=self.gen) * 2 - 1) * self.blind
        if self.blind_part < 1:
            h, w = batch.shape[-2:]
            side_h = max(1, round(h * self.blind_part ** 0.5))
            side_w = max(1, round(w * self.blind_part ** 0.5))
            mask = torch.zeros(batch.shape)
            for i in range(len(batch)):
                top = int(torch.randint(h - side_h + 1, (1,), generator=self.gen))
                left = int(torch.randint(w - side_w + 1, (1,), generator=self.gen))
                mask[i, :, top:top + side_h, left:left + side_w] = 1
            noise = noise * mask
        return torch.min(torch.max(batch + noise, self.x0 - self.eps),
                         self.x0 + self.eps).clamp(0, 1)

    def _moved(self, batch: torch.Tensor) -> torch.Tensor:
        """Each image shifted by up to ``shift`` pixels each way (edges repeated), or cropped
        by up to ``crop`` pixels a side and resized back, drawn afresh for every query."""
        out = []
        h, w = batch.shape[-2:]
        for image in batch:
            if self.shift:
                s = self.shift
                dy, dx = (int(v) for v in torch.randint(0, 2 * s + 1, (2,), generator=self.gen))
                padded = torch.nn.functional.pad(image[None], (s, s, s, s), mode="replicate")
                image = padded[0, :, dy:dy + h, dx:dx + w]
            if self.crop:
                t, b, left, r = (int(v) for v in
                                 torch.randint(0, self.crop + 1, (4,), generator=self.gen))
                image = torch.nn.functional.interpolate(
                    image[None, :, t:h - b, left:w - r], size=(h, w), mode="bilinear",
                    align_corners=False)[0]
            out.append(image.clamp(0, 1))
        return torch.stack(out)

    def _send(self, part: torch.Tensor) -> list[dict[str, Any]]:
        try:
            results = self._post(part)
            for _ in range(self.dilution):
                i = int(torch.randint(len(self.clean), (1,), generator=self.gen))
                self._post(self.clean[i:i + 1])
                self.clean_sent += 1
        except Denied:
            self.denied_at = self.queries
            raise
        return results

    def _judge(self, q: torch.Tensor, res: dict[str, Any]) -> None:
        """Note a success: ``res`` answers ``q`` (sent as it is) with a wrong class while ``q``
        lies within ε of the image."""
        c = int(res["class"])
        if c == self.y or float((q - self.x0).abs().max()) > self.eps + 1e-5:
            return
        if self.success_at is None:
            self.success_at = self.queries
        if self.evaded_at is None and res["verdict"] == "trusted":
            self.evaded_at = self.queries

    def ask(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classes and probabilities the service answers for ``batch`` (the image itself
        answered unsent, as its own class, where the start is kept unseen)."""
        if not self.unseen_start:
            return self._ask(batch)
        known = (batch == self.x0).flatten(1).all(1)
        classes = torch.full((len(batch),), self.y)
        probs = torch.nn.functional.one_hot(classes, self.classes).float()
        if (~known).any():
            classes[~known], probs[~known] = self._ask(batch[~known])
        return classes, probs

    def _ask(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.denied_at is not None:
            raise Denied
        if self.queries + len(batch) > self.budget:
            raise Spent
        if self.blind or self.adaptive:
            batch = self._blinded(batch)
        moving = bool(self.shift or self.crop)
        sent = self._moved(batch) if moving else batch
        classes, probs = [], []
        for start in range(0, len(batch), self.per_request):
            part = batch[start:start + self.per_request]
            results = self._send(sent[start:start + self.per_request])
            for q, res in zip(part, results, strict=True):
                self.queries += 1
                c = int(res["class"])
                if not moving:
                    self._judge(q, res)
                elif c != self.y:  # cash in: the candidate itself, unmoved
                    self.queries += 1
                    res = self._send(q[None])[0]
                    self._judge(q, res)
                    c = int(res["class"])  # the attack goes on from what the cash-in said
                classes.append(c)
                probs.append(res.get("probabilities") or np.eye(self.classes)[c].tolist())
                again = tuple(probs[-1]) in self.seen
                self.as_before += again
                self.seen.add(tuple(probs[-1]))
                if self.adaptive:
                    self.blind = (min(self.eps, max(self.blind, self.eps / 8) * 1.5) if again
                                  else self.blind * 0.95)
        return torch.tensor(classes), torch.tensor(probs, dtype=torch.float32)


class ServiceModel(nn.Module):
    """The service as a model for torchattacks: log-probabilities from its answers."""

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.target = target
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # the device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.ask(x.detach().cpu())[1].clamp_min(1e-12).log()


def square(t: Target) -> None:
    import torchattacks

    attack = torchattacks.Square(ServiceModel(t), norm="Linf", eps=t.eps, n_queries=t.budget,
                                 n_restarts=1, p_init=0.8, loss="margin", resc_schedule=False,
                                 seed=0)
    attack(t.x0[None], torch.tensor([t.y]))


def simba(t: Target, step: float) -> None:
    """SimBA in the pixel basis, within the ε-ball: try +step, then −step, on each pixel in a
    random order; keep a step that lowers the true class's probability."""
    x = t.x0.clone()
    p = t.ask(x[None])[1][0, t.y]
    for i in torch.randperm(x.numel(), generator=t.gen).tolist():
        for sign in (1.0, -1.0):
            cand = x.clone()
            flat = cand.view(-1)
            flat[i] = (flat[i] + sign * step).clamp(float(t.x0.view(-1)[i]) - t.eps,
                                                    float(t.x0.view(-1)[i]) + t.eps).clamp(0, 1)
            c, probs = t.ask(cand[None])
            if probs[0, t.y] < p:
                x, p = cand, probs[0, t.y]
                break
        if t.success_at is not None:
            return


def hopskipjump(t: Target) -> None:
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    def predict(batch: np.ndarray) -> np.ndarray:
        classes, _ = t.ask(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
        return np.eye(t.classes, dtype=np.float32)[classes.numpy()]

    clf = BlackBoxClassifier(predict, tuple(t.x0.shape), t.classes, clip_values=(0.0, 1.0))
    attack = HopSkipJump(clf, norm=np.inf, max_iter=50, max_eval=200, init_eval=20,
                         init_size=100, batch_size=64, verbose=False)
    attack.generate(t.x0[None].numpy())


ATTACKS: dict[str, tuple[Callable[..., None], int]] = {  # attack, queries per request
    "square": (square, 1), "simba": (simba, 1), "hopskipjump": (hopskipjump, 64)}


def run(name: str, url: str, keys: list[list[str]], x: torch.Tensor, y: torch.Tensor,
        eps: float, budget: int, classes: int, clean: torch.Tensor, *, blind: float = 0.0,
        blind_part: float = 1.0, dilution: int = 0, simba_step: float = 0.2,
        threads: int = 12, adaptive: bool = False, shift: int = 0,
        crop: int = 0, right: torch.Tensor | None = None,
        unseen_start: bool = False) -> dict[str, Any]:
    fn, per_request = ATTACKS[name]
    http = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32))

    def one(i: int) -> Target:
        t = Target(http, keys[i], x[i], int(y[i]), eps, budget, classes, per_request,
                   blind=blind, dilution=dilution, clean=clean, seed=i, blind_part=blind_part,
                   adaptive=adaptive, shift=shift, crop=crop, unseen_start=unseen_start)
        try:
            if name == "simba":
                simba(t, simba_step)
            else:
                fn(t)
        except (Denied, Spent):
            pass
        return t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        targets = list(pool.map(one, range(len(x))))
    http.close()
    wins = [t.success_at for t in targets if t.success_at is not None]
    evasions = [t.evaded_at for t in targets if t.evaded_at is not None]
    denied = [t for t in targets if t.denied_at is not None]
    return {
        "images": len(targets), "eps": eps, "budget": budget, "blind": blind,
        "blind_part": blind_part, "keys_per_image": len(keys[0]), "dilution": dilution,
        "shift": shift, "crop": crop, "unseen_start": unseen_start,
        "seconds": round(time.perf_counter() - t0, 1),
        "fooled_rate": len(wins) / len(targets),
        "median_queries_to_fool": statistics.median(wins) if wins else None,
        "evaded_rate": len(evasions) / len(targets),
        # fooled and trusted among the images the model classifies right before any attack
        "clean_right": None if right is None else int(right.sum()),
        "evaded_of_clean_right": None if right is None else sum(
            t.evaded_at is not None for t, ok in zip(targets, right.tolist(), strict=True)
            if ok),
        "median_queries_to_evade": statistics.median(evasions) if evasions else None,
        "denied": len(denied),
        "median_queries_answered_until_denial": (
            statistics.median(t.denied_at for t in denied) if denied else None),
        "max_queries_answered_until_denial": max((t.denied_at for t in denied), default=None),
        "clean_images_sent": sum(t.clean_sent for t in targets),
        "adaptive": adaptive,
        "detected": sum(t.detected_at is not None for t in targets),
        "median_queries_to_detection": (statistics.median(
            t.detected_at for t in targets if t.detected_at is not None)
            if any(t.detected_at is not None for t in targets) else None),
        "answers_as_before": sum(t.as_before for t in targets),
        "queries_answered": sum(t.queries for t in targets)}


LABEL_ONLY = ("--outputs", "label")  # answers carry the class and verdict, no numbers
UNGUARDED = ("--no-query-watch", "--flagged-limit", "0", "--max-flagged", "0",
             "--max-repeats", "0", "--max-flips", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist"))
    parser.add_argument("--data-dir", default=None, help="where a named dataset lies")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="train: validation traffic, for choosing the watch's settings")
    parser.add_argument("--first", type=int, default=0, help="the first image attacked")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--budget", type=int, default=1000, help="queries per image")
    parser.add_argument("--hsj-budget", type=int, default=2000)
    parser.add_argument("--simba-step", type=float, default=0.2)
    parser.add_argument("--blind", type=float, default=0.1)
    parser.add_argument("--attacks", default="square,simba,hopskipjump")
    parser.add_argument("--dilution", default="1,5,10", help="clean images per attack query")
    parser.add_argument("--spread", default="3,10", help="keys an attack takes turns with")
    parser.add_argument("--moves", default="shift-2,crop-2",
                        help="blinding by moving the image: shift-S (up to S pixels each "
                             "way), crop-C (up to C pixels a side, resized back)")
    parser.add_argument("--only", default=None, help="comma-separated settings to (re)run")
    parser.add_argument("--out", default="blackbox")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    hold(args.guard_dir)  # one benchmark at a time on a guard folder
    guard = Guard.load(args.guard_dir)
    info = guard.info
    test = load_data(guard.config.dataset, args.split, data_dir=args.data_dir)
    picked = range(args.first, args.first + args.images)
    x = torch.stack([test[i][0] for i in picked])
    y = torch.tensor([int(test[i][1]) for i in picked])
    clean = torch.stack([test[i][0] for i in range(5000, 5500)])  # the diluter's clean images
    # the images the model gets right before any attack: an attack's first query is the
    # image itself, so a misclassified image the detector trusts is "fooled and trusted"
    # whatever the watch does; the rows say how many of theirs were among the right ones
    right = torch.from_numpy(guard.verdicts(x).predicted) == y
    path = RESULTS / f"{args.out}.json"
    before: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    done: dict[str, Any] = before.get("runs", {})
    kept = {k: before[k] for k in ("model_file", "note") if k in before}  # written by hand
    settings: list[tuple[str, str, dict[str, Any]]] = []
    for name in args.attacks.split(","):
        settings += [(f"{name}/unguarded", name, {}), (f"{name}/guarded", name, {})]
        if name != "hopskipjump":
            settings.append((f"{name}/guarded/blinded", name, {"blind": args.blind}))
            # noise of up to ε on half of the image, redrawn every query
            settings.append((f"{name}/guarded/blinded-half-eps", name,
                             {"blind": args.eps, "blind_part": 0.5}))
        for move in args.moves.split(",") if args.moves else ():  # shifts and crops
            kind, size = move.split("-")
            done_as = {"shift": "shifted", "crop": "cropped"}[kind]
            for where in ("unguarded", "guarded"):
                settings.append((f"{name}/{where}/{done_as}-{size}", name, {kind: int(size)}))
            # moved over 10 keys: each key's history holds a tenth of the moved queries; the
            # global index aligns them with the other keys' newest
            settings.append((f"{name}/guarded/keys-10/{done_as}-{size}", name,
                             {kind: int(size), "spread": 10}))
        if name != "hopskipjump":  # OARS-style adaptive blinding, alone and over 10 keys
            settings.append((f"{name}/guarded/adaptive", name, {"adaptive": True}))
            settings.append((f"{name}/guarded/keys-10/adaptive", name,
                             {"adaptive": True, "spread": 10}))
        if name == "hopskipjump":  # decision-based: the deployment that answers labels only
            settings.append((f"{name}/guarded/label-only", name, {"serve": LABEL_ONLY}))
        for n in map(int, args.spread.split(",")):
            settings.append((f"{name}/guarded/keys-{n}", name, {"spread": n}))
            if name != "hopskipjump":
                settings.append((f"{name}/guarded/keys-{n}/blinded-half-eps", name,
                                 {"spread": n, "blind": args.eps, "blind_part": 0.5}))
        # the attacker who knows the flip rule keeps its start unseen: alone, and with the
        # blinding that fooled the watch most (a crop; shifts over 10 keys)
        settings.append((f"{name}/guarded/unseen-start", name, {"unseen_start": True}))
        if name == "square":
            settings += [(f"{name}/guarded/cropped-2/unseen-start", name,
                          {"crop": 2, "unseen_start": True}),
                         (f"{name}/guarded/keys-10/shifted-2/unseen-start", name,
                          {"shift": 2, "spread": 10, "unseen_start": True})]
    settings += [(f"square/guarded/dilution-{k}", "square", {"dilution": k})
                 for k in map(int, args.dilution.split(","))]
    only = None if args.only is None else set(args.only.split(","))
    for setting, name, kw in settings:
        if (only is None and setting in done) or (only is not None and setting not in only):
            continue
        spread = kw.pop("spread", 1)
        serve_args = kw.pop("serve", ())
        ids = [[f"bb-{setting.replace('/', '-')}-{i}-{j}" for j in range(spread)]
               for i in range(args.images)]
        keys = read_keys(args.guard_dir / KEYS)  # afresh: another benchmark may have added
        keys.update({f"{c}-key-{'x' * 16}": Client(c) for row in ids for c in row})
        write_keys(args.guard_dir / KEYS, keys)
        key_of = {c.id: k for k, c in keys.items()}
        extra = UNGUARDED if "/unguarded" in setting else serve_args
        proc = start_server(args.guard_dir, args.port, args.guard_dir / "bb-clients.db", *extra)
        try:
            budget = args.hsj_budget if name == "hopskipjump" else args.budget
            result = run(name, f"http://127.0.0.1:{args.port}",
                         [[key_of[c] for c in row] for row in ids], x, y,
                         args.eps, budget, info.num_classes, clean,
                         simba_step=args.simba_step, right=right, **kw)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        done[setting] = {**result, "policy": Policy().to_json(), "serve_args": " ".join(extra)}
        print(setting, json.dumps(result), flush=True)
        save(args.out, {"guard": json.loads((args.guard_dir / "guard.json").read_text()),
                        "policy": Policy().to_json(), "unguarded": " ".join(UNGUARDED),
                        "images": (f"{guard.config.dataset} {args.split} images "
                                   f"{args.first}–{args.first + args.images - 1}"),
                        "runs": done, **kept}, args.guard_dir)


if __name__ == "__main__":
    main()
