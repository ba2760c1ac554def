"""Options declared once: a config dataclass field carries its default, its help text and how
the command line's text becomes its value; the CLI builds its options from these fields.

    epochs: int = option(10, "victim training epochs")
    strengths: tuple[float, ...] = option((), "MAT strengths, e.g. 0.1,0.2", parse=strengths)
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from fractions import Fraction
from numbers import Real
from typing import Any

import numpy as np
import torch

from advguard.errors import InputError

Parser = Callable[[str], Any]


def option(default: Any, help: str, *, parse: Parser | None = None,  # noqa: A002
           cli: bool = True, fallback: str | None = None,
           aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text; ``parse`` turns the command line's text into the
    value (the CLI then takes text); ``cli=False`` keeps the field off the command line;
    ``fallback`` names where a command that leaves it out takes its value from instead (e.g.
    "the recipe's"); ``aliases``: other spellings of the option (``--dataset``)."""
    meta = {"help": help, "parse": parse, "cli": cli, "fallback": fallback, "aliases": aliases}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default, not a mutable one")
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls: type, name: str) -> Any:
    """A field declared as ``cls``'s field ``name`` is: its default and help, declared there
    once (e.g. ``k`` of the detection experiment is the detector's ``k``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(f.default, f.metadata["help"], parse=f.metadata.get("parse"))


def strengths(text: str) -> tuple[float, ...]:
    """``"0.1,0.2"`` or ``"1/255,3/255"`` -> L∞ strengths (each in [0, 1]). Text that names no
    strength is an error: leave the option out instead."""
    return tuple(check_strengths(radii(text)))


def device(name: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``);
    ``auto`` is ``cuda`` where CUDA is available, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but CUDA is not available on this "
                             "machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {name!r} asked for, but MPS is not available here")
    elif dev.type != "cpu":
        raise InputError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return name


def check_fraction(name: str, value: float, *, low_open: bool = True) -> None:
    """``value`` must be a finite number in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (0 < value <= 1) if low_open else (0 <= value <= 1)):
        raise InputError(f"{name} must be a number in {'(0' if low_open else '[0'}, 1], got "
                         f"{value!r}")


def check_below_one(name: str, value: float) -> None:
    """``value`` must be a finite number in [0, 1) (a decay, a share, a smoothing)."""
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise InputError(f"{name} must be in [0, 1), got {value!r}")


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < float("inf")):
        raise InputError(f"{name} must be a positive finite number, got {value!r}")


def check_strengths(eps: float | Sequence[float]) -> list[float]:
    """Validate an L∞ strength or a list of them (pixel units, each in [0, 1]); NumPy and
    tensor scalars and 1-d arrays count as numbers and lists."""
    if isinstance(eps, (torch.Tensor, np.ndarray)) and eps.ndim <= 1:
        eps = eps.tolist()
    if isinstance(eps, (str, bytes)) or not (is_number(eps) or isinstance(eps, Iterable)):
        raise InputError(f"strength eps={eps!r} must be a number in [0, 1] or a list of them")
    values: list[Any] = [eps] if is_number(eps) else list(eps)  # type: ignore[arg-type]
    if not values:
        raise InputError("no strength given: eps must be a float or a non-empty list")
    for e in values:
        if not is_number(e) or not 0.0 <= float(e) <= 1.0:
            raise InputError(f"strength eps={e!r} must be a number in [0, 1] (pixel units; "
                             "0-255 strengths are eps/255)")
    return [float(e) for e in values]


def is_number(value: object) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def radii(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` or ``"0,8/255"``: strengths of any norm (≥ 0; the attack's norm checks
    the upper bound: 1 in L∞, the image cube's diameter in L2)."""
    try:
        values = tuple(float(Fraction(t.strip())) for t in text.split(",") if t.strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot read strengths {text!r}: give comma-separated numbers such as "
                         "0.1,0.2,0.3 or 1/255,3/255") from None
    if not values:
        raise InputError(f"no strength in {text!r}: give comma-separated numbers such as "
                         "0.1,0.2,0.3, or leave the option out for its default")
    if any(not 0 <= v < float("inf") for v in values):
        raise InputError(f"strengths must be numbers ≥ 0, got {text!r}")
    return values


def radius(text: str) -> float:
    """One strength of any norm: ``"0.5"`` or ``"8/255"``."""
    values = radii(text)
    if len(values) != 1:
        raise InputError(f"give one strength such as 0.3 or 8/255, got {text!r}")
    return values[0]


def strength(text: str) -> float:
    """One strength: ``"0.3"`` or ``"8/255"``."""
    values = strengths(text)
    if len(values) != 1:
        raise InputError(f"give one strength such as 0.3 or 8/255, got {text!r}")
    return values[0]


def limit(text: str) -> int | None:
    """A number of images: ``"1000"``, or ``"all"`` for no limit."""
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"give a number of images or 'all', got {text!r}") from None
    check_int("the number of images", value)
    return value


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


def check_int(name: str, value: Any, minimum: int = 1,
              types: tuple[type, ...] = (int,)) -> None:
    """``value`` must be an integer (of ``types``, never a bool) ≥ ``minimum``."""
    ok = not isinstance(value, bool) and isinstance(value, types)
    if not ok or operator.lt(value, minimum):
        raise InputError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def check_at_least(config: Any, minimum: int, *names: str) -> None:
    """Each named integer field (``None`` allowed) must be an integer ≥ ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            check_int(name, value, minimum)
