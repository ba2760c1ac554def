"""Per-client statistics of the guard's verdicts, and the denial of clients that keep sending
adversarial inputs (paper 003 §5.1, SPEC B6: "a source of adversarial inputs can be isolated").

A client is denied — for ``cooldown_s`` seconds (0: until an admin clears it) — by the first of
three rules (:func:`judge`):

* *attack process*: ``max_repeats`` of its queries within ``window_s`` seconds were near-copies
  of its earlier ones (:mod:`advguard.serve.queries`, the stateful detection of query-based
  black-box attacks);
* *flagged budget*: ``max_flagged`` of its images within ``window_s`` were flagged — an absolute
  count, so interleaving clean images (dilution) does not lower it;
* *flagged share*: once its last ``window`` verdicts number ``min_requests``, the flagged share
  among them reaches ``flagged_limit`` (fast for blatant attackers).

A request is admitted or refused in one atomic step of the store (:meth:`Store.admit`): its
verdicts are counted, and if they bring the client to a denial the request is refused and its
answers withheld — parallel requests cannot outrun a denial, and a client is answered fewer
than ``max_flagged`` flagged images a window. When a cool-down ends, the client starts afresh.

The stores that hold this state are in :mod:`advguard.serve.stores` (SQLite) and
:mod:`advguard.serve.redis_store`; what every store offers is :class:`Store`, and
:func:`reporting` turns a store's backend errors into one :class:`StateError`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, TypeVar

import numpy as np

from advguard.errors import InputError, StateError
from advguard.options import check_at_least, option
from advguard.serve.matching import Bank, prepare
from advguard.serve.queries import QueryWatch


@dataclass(frozen=True)
class Policy:
    window: int = option(50, "verdicts per client kept for the flagged-share rule")
    min_requests: int = option(20, "verdicts in the window before the share rule can deny")
    # the budget and the share limit: chosen on validation traffic, the least answered to
    # white-box attackers that denies no honest client (benchmarks/choose_policy.py)
    flagged_limit: float = option(0.6, "flagged share of the window that denies a client; "
                                       "0: share rule off")
    max_flagged: int = option(40, "flagged images within window_s that deny a client, however "
                                  "many clean ones surround them; 0: off")
    # a detected near-copy is answered as the query it copies was (serve.queries), so past its
    # first query_k queries in one ε-ball an attacker gets no fresh answer: denial is not what
    # stops it. Detections deny no one by default (honest cameras send near-copies all day),
    # and neither do flips — a near-copy the model would have answered with another class, as
    # a query attack sends when it crosses the boundary: on validation traffic no flip limit
    # changed how many attack streams were fooled and trusted (none at any limit), while
    # behind the plain LeNet-5 a limit of 2 denied 3 of 10 jittering cameras and 9 of 10
    # clients sending augmented copies (benchmarks/choose_flip_limit.py; behind the mixed-MAT
    # one no honest stream flipped): only a model that holds its class over its clients'
    # copies can afford to deny on them (--max-flips N)
    max_repeats: int = option(0, "attack-process detections (queries too close to the "
                                 "client's recent ones or to other keys') within window_s "
                                 "that deny a client; 0: off")
    max_flips: int = option(0, "near-copies within window_s that the model would have "
                               "answered with another class than they were (their earlier "
                               "answer) that deny a client; 0: off")
    # an attack's success inside the ball lies beside a query the model classified otherwise;
    # so does a copy of an honest image whose class the model does not hold (augmented copies,
    # a jittering camera's frames: SERVING.md says how often)
    flag_beside: bool = option(True, "answer flagged a query the model gives another class "
                                     "than an earlier query inside its ball, before the watch "
                                     "has query_k to detect it (counted as a flip either way)")
    window_s: float = option(3600.0, "seconds over which flagged images and attack-process "
                                     "detections are counted")
    cooldown_s: float = option(3600.0, "seconds a denial lasts; 0: until an admin clears it",
                               aliases=("--cooldown",))
    deny_linked: bool = option(True, "count an attack-process detection also on the keys "
                                     "whose queries it near-copied (the global index), once "
                                     "such a key has a detection of its own")
    count_unlike: bool = option(False, "count inputs unlike any training image as flagged "
                                       "evidence too (stricter on attackers whose images look "
                                       "unnatural, and on honest clients with odd images)")

    def __post_init__(self) -> None:
        check_at_least(self, 1, "window", "min_requests")
        check_at_least(self, 0, "max_flagged", "max_repeats", "max_flips")
        if self.min_requests > self.window:
            raise InputError(f"min_requests ({self.min_requests}) cannot exceed the window "
                             f"({self.window})")
        if not 0 <= self.flagged_limit <= 1:
            raise InputError(f"flagged_limit must be in [0, 1] (0: off), got "
                             f"{self.flagged_limit!r}")
        if not 0 <= self.cooldown_s < math.inf:
            raise InputError(f"cooldown_s must be a finite number ≥ 0, got {self.cooldown_s!r}")
        if not 0 < self.window_s < math.inf:
            raise InputError(f"window_s must be a finite number > 0, got {self.window_s!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClientStatus:
    client: str
    requests: int  # images judged, all time
    flagged: int  # of which flagged, all time
    window: int  # verdicts in the current window
    window_flagged: int  # flagged verdicts in the current window
    window_mean_score: float  # mean kNN score over the window (1.0 when empty)
    recent_flagged: int  # flagged images within the policy's window_s
    recent_repeats: int  # attack-process detections within window_s
    queries: int  # queries in the client's history (stateful detection)
    denied_until: float | None  # epoch seconds; inf = until cleared; None = not denied
    reason: str | None
    denials: int  # times this client was denied
    last_seen: float | None
    linked: Sequence[str] = ()  # clients its attack-process detections linked it to (window_s)
    recent_flips: int = 0  # near-copies within window_s the model would have answered otherwise

    @classmethod
    def empty(cls, client: str) -> ClientStatus:
        return cls(client, 0, 0, 0, 0, 1.0, 0, 0, 0, None, None, 0, None)

    def denied(self, now: float) -> bool:
        return self.denied_until is not None and now < self.denied_until

    def to_json(self) -> dict[str, Any]:
        # its fields are numbers and strings: a shallow copy (asdict copies deeply, field by
        # field, a tenth of the event loop's own time for one answer)
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["linked"] = list(self.linked)
        if out["denied_until"] == math.inf:
            out["denied_until"] = "until cleared"
        return out


@dataclass(frozen=True)
class Evidence:
    """What a store counts of one client when it decides."""

    window: int  # verdicts in the share window
    window_flagged: int
    recent_flagged: int  # within window_s
    recent_repeats: int
    recent_flips: int = 0


def judge(e: Evidence, policy: Policy) -> str | None:
    """Why the client is to be denied, or None (the rules of this module's docstring)."""
    p = policy
    if p.max_repeats and e.recent_repeats >= p.max_repeats:
        return (f"{e.recent_repeats} of its queries within {p.window_s:g} s were near-copies of "
                f"its earlier ones or of other keys' recent ones, as a query-based attack sends "
                f"(limit {p.max_repeats})")
    if p.max_flips and e.recent_flips >= p.max_flips:
        return (f"{e.recent_flips} of its queries within {p.window_s:g} s were near-copies of "
                f"earlier queries that the model would have answered with another class, as "
                f"a query-based attack that finds an adversarial example sends (limit "
                f"{p.max_flips})")
    if p.max_flagged and e.recent_flagged >= p.max_flagged:
        return (f"{e.recent_flagged} of its inputs within {p.window_s:g} s were flagged as "
                f"adversarial (limit {p.max_flagged})")
    if (p.flagged_limit and e.window >= p.min_requests
            and e.window_flagged >= p.flagged_limit * e.window):
        return (f"{e.window_flagged} of its last {e.window} inputs were flagged as adversarial "
                f"(limit {100 * p.flagged_limit:g}% after {p.min_requests})")
    return None


@dataclass(frozen=True)
class Admission:
    """A store's decision on one request: whether it is answered, the client's status after
    it, which of its queries were attack-process detections, and the answer each query is to
    be given instead of its fresh one (the earlier answer of a near-copy, or a flip's own told
    flagged: :func:`advguard.serve.state.watched`; None: fresh)."""

    answered: bool
    status: ClientStatus
    repeats: np.ndarray  # (N,) bool
    denied_now: bool = False  # this request brought the denial
    answers: Sequence[str | None] = ()
    # which queries were answered as an earlier one (a near-copy or a resend; empty: none) —
    # the rest of ``answers`` that are not None are flips told flagged
    as_before: Sequence[bool] = ()


@dataclass(frozen=True)
class StoreHealth:
    kind: str  # sqlite or redis
    ok: bool
    detail: str | None  # what went wrong, when it did


class Store(Protocol):
    policy: Policy
    watch: QueryWatch | None  # None: no stateful detection

    def admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
              codes: np.ndarray | Bank | None = None, now: float | None = None,
              answers: Sequence[str] | None = None,
              moved: np.ndarray | None = None) -> Admission: ...
    def record(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               now: float | None = None) -> ClientStatus: ...
    def get(self, client: str, now: float | None = None) -> ClientStatus: ...
    def clients(self, now: float | None = None) -> list[ClientStatus]: ...
    def clear(self, client: str) -> ClientStatus: ...
    def health(self) -> StoreHealth: ...
    def close(self) -> None: ...


F = TypeVar("F", bound=Callable[..., Any])


def reporting(fn: F) -> F:
    """A :class:`CheckedStore` method whose backend errors become one :class:`StateError`,
    remembered by the store's ``error`` until a later call succeeds."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(self, *args, **kwargs)
        except self.backend_errors as exc:
            self.error = f"{self.where}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            raise StateError(f"client state unavailable ({self.error})") from None
        self.error = None
        return out

    return wrapper  # type: ignore[return-value]


class CheckedStore:
    """What both stores share: their backend's errors (``backend_errors``) reported by
    :func:`reporting` as one line naming ``where``, :meth:`health` from a cheap probe, and
    :meth:`record` (:meth:`admit` without queries)."""

    kind: str  # sqlite or redis
    where: str  # the file or server, as errors name it
    backend_errors: tuple[type[Exception], ...]
    error: str | None = None  # the last backend error, until a call succeeds
    policy: Policy
    watch: QueryWatch | None = None

    def admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
              codes: np.ndarray | Bank | None = None, now: float | None = None,
              answers: Sequence[str] | None = None,
              moved: np.ndarray | None = None) -> Admission:
        """Count a request's verdicts (and, when queries are watched, its query codes, or the
        codes prepared already by :func:`~advguard.serve.matching.prepare`, with the
        ``answers`` the model gives them, as JSON: see :mod:`advguard.serve.state`, and for
        pooled views their moved windows, :func:`advguard.serve.queries.moves`, which prepared
        codes carry already) and decide in one atomic step whether it is answered, and which
        answers are replaced."""
        return self._admit(client, flagged, scores, self.watching(codes, len(flagged), moved),
                           time.time() if now is None else now,
                           list(answers) if answers is not None else ["{}"] * len(flagged))

    def _admit(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               queries: Bank | None, now: float, answers: list[str]) -> Admission:
        raise NotImplementedError

    def record(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               now: float | None = None) -> ClientStatus:
        """Count a request's verdicts (and deny the client if they bring it to a denial)."""
        return self.admit(client, flagged, scores, None, now).status

    def watching(self, codes: np.ndarray | Bank | None, n: int,
                 moved: np.ndarray | None = None) -> Bank | None:
        """``codes`` prepared for the scan, when this store watches queries (checked against
        the request's size)."""
        if codes is None or self.watch is None:
            return None
        if len(codes) != n:
            raise InputError(f"{len(codes)} query codes for {n} verdicts")
        return prepare(codes if isinstance(codes, Bank) else np.asarray(codes, np.float16),
                       self.watch.shift, moved, self.watch.crop)

    def probe(self) -> None:
        """A cheap read that fails while the store is unusable (decorated with
        :func:`reporting` by each store)."""
        raise NotImplementedError

    def health(self) -> StoreHealth:
        try:
            self.probe()
        except StateError:
            pass
        return StoreHealth(self.kind, self.error is None, self.error)

