"""Command-line options built from a config dataclass: each field's default and help text are
declared once, on the field (:func:`advguard.options.option`)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]


def _cli_type(hint: Any, parse: Any) -> Any:
    """The type typer parses: text for fields with a parser, the plain type otherwise."""
    if parse is not None:
        return str | None
    return hint


def config_command(config_cls: type, run: Callable[..., None],
                   extra: list[inspect.Parameter]) -> Callable[..., None]:
    """A typer command whose options are ``config_cls``'s fields (plus ``extra`` parameters);
    it builds the config and calls ``run(config, **extra_values)``."""
    hints = typing.get_type_hints(config_cls)
    params: list[inspect.Parameter] = []
    parsers: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        parse = f.metadata.get("parse")
        parsers[f.name] = parse
        default = f.default
        if parse is not None:
            default = None
        elif isinstance(default, Enum):
            default = default.value
        annotation = Annotated[_cli_type(hints[f.name], parse),  # type: ignore[valid-type]
                               typer.Option(help=f.metadata.get("help", ""))]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=annotation))
    extra_names = [p.name for p in extra]

    def command(**kwargs: Any) -> None:
        rest = {name: kwargs.pop(name) for name in extra_names}
        values = {k: (parsers[k](v) if parsers[k] is not None and v is not None else v)
                  for k, v in kwargs.items() if not (parsers[k] is not None and v is None)}
        run(config_cls(**values), **rest)

    all_params = params + extra
    command.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in all_params}
    command.__doc__ = run.__doc__
    return command


def option_param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)
