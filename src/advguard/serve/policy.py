"""Per-client statistics of the guard's verdicts, and the denial of clients that keep sending
adversarial inputs (paper 003 §5.1, SPEC B6: "a source of adversarial inputs can be isolated").

Each client has a sliding window of its last ``window`` verdicts (flagged or trusted, with the
kNN score). Once the window holds at least ``min_requests`` verdicts and the flagged share in it
reaches ``flagged_limit``, the client is denied — for ``cooldown_s`` seconds (0: until an admin
clears it). When a cool-down ends the window starts afresh.

The stores that hold this state are in :mod:`advguard.serve.stores` (SQLite) and
:mod:`advguard.serve.redis_store`; what every store offers is :class:`Store`, and
:func:`reporting` turns a store's backend errors into one :class:`StateError`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from advguard.errors import InputError, StateError
from advguard.options import check_at_least, option


@dataclass(frozen=True)
class Policy:
    window: int = option(50, "verdicts per client kept in the sliding window")
    min_requests: int = option(10, "verdicts in the window before a client can be denied")
    flagged_limit: float = option(0.3, "flagged share of the window that denies a client")
    cooldown_s: float = option(3600.0, "seconds a denial lasts; 0: until an admin clears it",
                               aliases=("--cooldown",))

    def __post_init__(self) -> None:
        check_at_least(self, 1, "window", "min_requests")
        if self.min_requests > self.window:
            raise InputError(f"min_requests ({self.min_requests}) cannot exceed the window "
                             f"({self.window})")
        if not 0 < self.flagged_limit <= 1:
            raise InputError(f"flagged_limit must be in (0, 1], got {self.flagged_limit!r}")
        if not 0 <= self.cooldown_s < math.inf:
            raise InputError(f"cooldown_s must be a finite number ≥ 0, got {self.cooldown_s!r}")


@dataclass(frozen=True)
class ClientStatus:
    client: str
    requests: int  # images judged, all time
    flagged: int  # of which flagged, all time
    window: int  # verdicts in the current window
    window_flagged: int  # flagged verdicts in the current window
    window_mean_score: float  # mean kNN score over the window (1.0 when empty)
    denied_until: float | None  # epoch seconds; inf = until cleared; None = not denied
    reason: str | None
    denials: int  # times this client was denied
    last_seen: float | None

    def denied(self, now: float) -> bool:
        return self.denied_until is not None and now < self.denied_until

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["denied_until"] == math.inf:
            out["denied_until"] = "until cleared"
        return out


def reason(flagged: int, count: int, policy: Policy) -> str:
    return (f"{flagged} of its last {count} inputs were flagged as adversarial (limit "
            f"{100 * policy.flagged_limit:g}% after {policy.min_requests})")


@dataclass(frozen=True)
class StoreHealth:
    kind: str  # sqlite or redis
    ok: bool
    detail: str | None  # what went wrong, when it did


class Store(Protocol):
    policy: Policy

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
    :func:`reporting` as one line naming ``where``, and :meth:`health` from a cheap probe."""

    kind: str  # sqlite or redis
    where: str  # the file or server, as errors name it
    backend_errors: tuple[type[Exception], ...]
    error: str | None = None  # the last backend error, until a call succeeds

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

