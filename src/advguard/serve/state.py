"""One client's state and how a request changes it: pure functions that every store runs inside
its own atomic admission (SQLite: one ``BEGIN IMMEDIATE`` transaction; Redis: ``WATCH`` …
``MULTI``/``EXEC``). A store loads a client's :class:`Record`, calls :func:`admit` (and
:func:`attribute` for the clients a detection links it to), and saves what comes back; the
rules themselves (:func:`~advguard.serve.policy.judge`) live in :mod:`advguard.serve.policy`.

Answers are JSON (the result as the client is told it, and ``"_c"``: the class the model gave
the query it was first made for), kept with each query, so that a near-copy is answered as its
earlier query was and its *flip* — the model now answering another class — is counted.

A record is small and self-contained (totals, the denial, the share window's verdicts and the
evidence of the last ``window_s`` seconds), kept by a store as one JSON document; the query
histories it is judged with are kept beside it (:mod:`advguard.serve.queries`), because they
are large and grow by appending.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from advguard.serve.matching import Found
from advguard.serve.policy import ClientStatus, Evidence, Policy, judge

# (time, flagged images, own attack-process detections, detections attributed by linked keys,
# own flips — near-copies the model would have answered with another class — flips attributed
# by linked keys, the clients linked)
Entry = tuple[float, int, int, int, int, int, tuple[str, ...]]


@dataclass(frozen=True)
class Record:
    """What a store keeps of one client, apart from its query history."""

    requests: int = 0  # images judged, all time
    flagged: int = 0  # of which flagged, all time
    denials: int = 0
    last_seen: float | None = None
    denied_until: float | None = None  # epoch seconds; inf: until cleared
    reason: str | None = None
    # the share window, oldest first: (flagged 0/1, score) of the last ``window`` verdicts
    verdicts: tuple[tuple[int, float], ...] = ()
    # what the requests that brought any evidence brought, within ``window_s`` (Entry)
    evidence: tuple[Entry, ...] = ()

    def denied(self, now: float) -> bool:
        return self.denied_until is not None and now < self.denied_until

    def expired(self, now: float) -> bool:
        """A denial whose cool-down has passed: the client starts afresh (its query history
        is emptied by the store)."""
        return self.denied_until is not None and now >= self.denied_until

    def afresh(self) -> Record:
        """The denial lifted, the window and the evidence emptied; the totals stay."""
        return replace(self, denied_until=None, reason=None, verdicts=(), evidence=())

    def recent(self, now: float, policy: Policy) -> tuple[Entry, ...]:
        return tuple(e for e in self.evidence if e[0] > now - policy.window_s)

    def to_json(self) -> str:
        # the fields by hand: dataclasses.asdict recursed into every tuple of the window and
        # the evidence, a third of an admission's time
        obj = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.denied_until == math.inf:
            obj["denied_until"] = "inf"
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Record:
        if not text:
            return cls()
        obj: dict[str, Any] = json.loads(text)
        if obj.get("denied_until") == "inf":
            obj["denied_until"] = math.inf
        obj["verdicts"] = tuple((int(f), float(s)) for f, s in obj.get("verdicts", ()))
        obj["evidence"] = tuple((float(t), int(b), int(r), int(a), int(f), int(af), tuple(links))
                                for t, b, r, a, f, af, links in obj.get("evidence", ()))
        return cls(**obj)


def evidence(record: Record, now: float, policy: Policy) -> Evidence:
    """What the rules count of ``record`` at ``now``: detections attributed to it by linked
    keys count only once it has made one of its own within ``window_s`` (so nobody can get an
    honest client denied by sending near-copies of the images it sent), and only with
    ``policy.deny_linked``."""
    recent = record.recent(now, policy)
    own = sum(e[2] for e in recent)
    linked = bool(own and policy.deny_linked)
    return Evidence(len(record.verdicts), sum(f for f, _ in record.verdicts),
                    sum(e[1] for e in recent), own + linked * sum(e[3] for e in recent),
                    sum(e[4] for e in recent) + linked * sum(e[5] for e in recent))


def status(client: str, record: Record, queries: int, now: float,
           policy: Policy) -> ClientStatus:
    """The client's status as the service reports it (``queries``: its history's size)."""
    if record.expired(now):
        record = record.afresh()
    e = evidence(record, now, policy)
    scores = [s for _, s in record.verdicts]
    linked = sorted({c for entry in record.recent(now, policy) for c in entry[6]})
    return ClientStatus(client, record.requests, record.flagged, e.window, e.window_flagged,
                        sum(scores) / len(scores) if scores else 1.0, e.recent_flagged,
                        e.recent_repeats, queries, record.denied_until, record.reason,
                        record.denials, record.last_seen, linked, e.recent_flips)


@dataclass(frozen=True)
class Step:
    """:func:`admit`'s outcome: the record to save, and whether the request is answered."""

    record: Record
    answered: bool
    denied_now: bool = False  # this request brought the denial


def _deny(record: Record, why: str | None, now: float, policy: Policy) -> Record:
    if why is None:
        return record
    until = now + policy.cooldown_s if policy.cooldown_s > 0 else math.inf
    return replace(record, denied_until=until, reason=why, denials=record.denials + 1)


def admit(record: Record, flagged: Sequence[bool], scores: Sequence[float], repeats: int,
          linked: Sequence[str], now: float, policy: Policy, flips: int = 0,
          as_before: Sequence[bool] = ()) -> Step:
    """Count a request (its verdicts, ``repeats`` attack-process detections among its
    queries, which linked it to the clients ``linked``, and ``flips``: near-copies the model
    would have answered with another class than the earlier answer they were given) and
    decide whether it is answered: a denied client's request is refused and not counted; a
    request that brings the client to a denial is refused too (the record it returns holds
    the denial). Queries answered as before (``as_before``: a near-copy or a resend, given an
    earlier query's answer) add no verdict: theirs was counted when it was first given, and a
    camera resending one flagged scene is one flagged image, not one a frame."""
    if record.expired(now):
        record = record.afresh()
    if record.denied(now):
        return Step(record, False)
    before = list(as_before) or [False] * len(flagged)
    new = [(int(f), float(s)) for f, s, b in zip(flagged, scores, before, strict=True) if not b]
    verdicts = (record.verdicts + tuple(new))[-policy.window:]
    bad = sum(f for f, _ in new)
    kept = record.recent(now, policy)
    if bad or repeats or flips:
        kept += ((now, bad, int(repeats), 0, int(flips), 0, tuple(sorted(set(linked)))),)
    record = replace(record, requests=record.requests + len(flagged),
                     flagged=record.flagged + bad, last_seen=now, verdicts=verdicts,
                     evidence=kept)
    why = judge(evidence(record, now, policy), policy)
    return Step(_deny(record, why, now, policy), why is None, why is not None)


def attribute(record: Record, by: str, repeats: int, now: float, policy: Policy,
              flips: int = 0) -> Record:
    """Count against a client the ``repeats`` detections (and ``flips``) that client ``by``'s
    queries made against its queries (the global index linked them): an attack spread over
    several keys is counted on every key it used, and a key that reaches a rule is denied at
    once (its next request is refused)."""
    if record.expired(now):
        record = record.afresh()
    if record.denied(now) or (repeats <= 0 and flips <= 0):
        return record
    record = replace(record, evidence=record.recent(now, policy) + (
        (now, 0, 0, int(repeats), 0, int(flips), (by,)),))
    why = judge(evidence(record, now, policy), policy)
    if why is not None:
        why = f"linked to client {by!r}: {why}"
    return _deny(record, why, now, policy)


MODEL_CLASS = "_c"  # an answer's private field: the class the model gave the query


def kept(result: dict[str, Any], model_class: int) -> str:
    """An answer as the watch keeps it with its query: the result the client is told, and the
    class the model gave (which a fail-closed answer does not tell)."""
    return json.dumps({**result, MODEL_CLASS: int(model_class)})


def shown(answer: str) -> dict[str, Any]:
    """A kept answer as the client is told it again."""
    return {k: v for k, v in json.loads(answer).items() if k != MODEL_CLASS}


def settled(given: str, fresh: str) -> str:
    """The earlier answer ``given`` to a near-copy (kept as it was), as the near-copy is told
    it: vouched for no more than the query itself would be (``fresh``, the model's own answer
    to it) — where the model gives the query another class than the earlier answer names (a
    flip), or the detector flags the query, the earlier answer is told flagged (failing
    closed, :func:`advguard.serve.reveal.withheld` leaves its verdict only). Reusing an
    answer tells an attacker nothing new about the class; it must not vouch for a class the
    model does not give the image sent (a boundary search's query inside the ball answered
    trusted with the wrong class of an earlier query beside it). The history keeps the
    earlier answer itself, so a camera's later frames are judged against their scene's
    answer, not against a noisy frame's."""
    g, f = json.loads(given), json.loads(fresh)
    if g.get("verdict") != "trusted" or (f.get("verdict") == "trusted"
                                         and f.get(MODEL_CLASS) == g.get(MODEL_CLASS)):
        return given
    return flagged(given)


def answer_class(answer: str | None) -> int | None:
    """The class the model gave the query a kept answer was first made for (None when the
    answer does not say)."""
    if not answer:
        return None
    value = json.loads(answer).get(MODEL_CLASS)
    return None if value is None else int(value)


def flagged(answer: str) -> str:
    """A kept answer told flagged (its class and numbers as they were; failing closed,
    :func:`advguard.serve.reveal.withheld` leaves its verdict only)."""
    return json.dumps({**json.loads(answer), "verdict": "flagged"})


@dataclass(frozen=True)
class Watched:
    """What the watch's findings on a request come to: the kept answer each query is told
    instead of its fresh one (None: fresh), what its history keeps, which were answered as
    before (they add no verdict), and what is counted — detections, flips and, per linked
    client, the detections and flips of the queries that linked it."""

    told: list[str | None]
    kept: list[str]
    as_before: list[bool]
    repeats: int
    flips: int
    links: dict[str, tuple[int, int]]


def watched(found: Found, answers: Sequence[str], flag_beside: bool = True) -> Watched:
    """The findings ``found`` on a request whose fresh answers are ``answers``. A *flip* is a
    query the model gives another class than an earlier query it is taken for (a near-copy
    answered as before) or than most of the earlier queries that detected it, or — too few
    for a detection — than any earlier query it lies beside (inside its ball): an image
    within an attack's ball answered with another class than its neighbour is what an
    attack's success looks like, and an honest client's distinct images are almost never
    that close (on validation images, none of 1,000 MNIST or CIFAR-10 images had another
    class's image within the ball among 5,000 others). A flip beside a query of another class
    is told flagged and kept so (with ``flag_beside``, the policy's) — answered fresh or as
    its nearest: an attack's first in-ball success is not vouched for, nor its near-copies
    after it, whichever key sends them."""
    beside = found.beside or [()] * len(answers)
    told: list[str | None] = []
    flips: list[bool] = []
    for given, near, fresh in zip(found.answers, beside, answers, strict=True):
        if given is None and not near:  # answered fresh, nothing beside: no class to compare
            flips.append(False)
            told.append(None)
            continue
        c = answer_class(fresh)
        others = [answer_class(a) not in (None, c) for a in near]
        if given is not None:  # a near-copy: answered as its nearest was
            # most of the earlier queries inside its ball answered with another class than
            # the model gives it (the image itself and a crop search's earlier crops, around
            # a cash-in answered as the crop that tempted it): told flagged, however like its
            # nearest it is. Most, not any: a jittering camera's detected frames lie beside
            # the odd frame the model classified otherwise (on the mixed-MAT guard, any
            # such frame took its flips from 0.83% to 1.51% of the frames)
            against = sum(others) > len(others) / 2
            flips.append(against or answer_class(given) not in (None, c))
            told.append(flagged(given) if against and flag_beside else given)
            continue
        flips.append(any(others))
        told.append(flagged(fresh) if flips[-1] and flag_beside else None)
    links: Counter[str] = Counter(c for names in found.linked for c in names)
    flips_of: Counter[str] = Counter(c for names, f in zip(found.linked, flips, strict=True)
                                     if f for c in names)
    return Watched(told, [t if t is not None else a for t, a in zip(told, answers, strict=True)],
                   [a is not None for a in found.answers], int(found.detections.sum()),
                   sum(flips), {c: (n, flips_of[c]) for c, n in links.items()})


__all__ = ["MODEL_CLASS", "Record", "Step", "Watched", "admit", "answer_class",
           "attribute", "evidence", "flagged", "kept", "settled", "shown", "status", "watched"]
