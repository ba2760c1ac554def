"""Options declared once: a config dataclass field carries its default, its help text and how
the command line's text becomes its value; the CLI builds its options from these fields.

    epochs: int = option(10, "victim training epochs")
    strengths: tuple[float, ...] = option((), "MAT strengths, e.g. 0.1,0.2", parse=strengths)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum
from fractions import Fraction
from typing import Any

from advguard.errors import InputError

Parser = Callable[[str], Any]


def option(default: Any, help: str, *, parse: Parser | None = None,  # noqa: A002
           cli: bool = True) -> Any:
    """A dataclass field with its help text; ``parse`` turns the command line's text into the
    value (the CLI then takes text); ``cli=False`` keeps the field off the command line."""
    meta = {"help": help, "parse": parse, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default, not a mutable one")
    return dataclasses.field(default=default, metadata=meta)


def strengths(text: str) -> tuple[float, ...]:
    """``"0.1,0.2"`` or ``"1/255,3/255"`` -> floats (empty text: none)."""
    try:
        values = tuple(float(Fraction(t.strip())) for t in text.split(",") if t.strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot read strengths {text!r}: give comma-separated numbers such as "
                         "0.1,0.2,0.3 or 1/255,3/255") from None
    return values


def strength(text: str) -> float:
    """One strength: ``"0.3"`` or ``"8/255"``."""
    values = strengths(text)
    if len(values) != 1:
        raise InputError(f"give one strength such as 0.3 or 8/255, got {text!r}")
    return values[0]


def plain(value: Any) -> Any:
    """A config value as JSON would hold it (enums as values, tuples as lists)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def as_json(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict."""
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def check_at_least(config: Any, minimum: int, *names: str) -> None:
    """Each named integer field (``None`` allowed) must be an integer ≥ ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
