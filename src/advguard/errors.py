"""The errors advguard raises for bad input: each message names the problem in one line."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class AdvguardError(ValueError):
    """Base class of every user-facing advguard error (the CLI prints it as one line)."""


class InputError(AdvguardError):
    """Images or labels of the wrong shape, dtype, range, or containing NaN/inf."""


class TooLargeError(InputError):
    """Input over a size limit: too many images, pixels or bytes (a service answers 413)."""


class UnsupportedFormatError(InputError):
    """A readable file in a format advguard does not take (a service answers 415)."""


class StateError(AdvguardError):
    """A store of state (the guard's client state) that is unreadable, corrupt or unreachable:
    the message names it and what to do (a service answers 503)."""


class DataError(AdvguardError):
    """A dataset that is unknown, missing, or does not match its checksum/format."""


class CheckpointError(AdvguardError):
    """A checkpoint or run directory that is missing, truncated or of another model."""


def parse_choice(choices: type[E], value: str | E, what: str) -> E:
    """``choices(value)``, or an :class:`InputError` that lists the valid ``what``s."""
    try:
        return choices(value)
    except ValueError:
        raise InputError(f"unknown {what} {value!r}; choose one of: "
                         + ", ".join(str(c.value) for c in choices)) from None
