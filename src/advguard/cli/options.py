"""Command-line options built from a config dataclass: each field's default and help text are
declared once, on the field (:func:`advguard.options.option`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Sequence
from enum import Enum
from typing import Annotated, Any

import typer

from advguard.errors import parse_choice

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]


def config_command(configs: type | Sequence[type], run: Callable[..., None],
                   extra: list[inspect.Parameter], *,
                   partial: Collection[type] = ()) -> Callable[..., None]:
    """A typer command whose options are the fields of ``configs`` (one dataclass or several,
    no name twice) plus ``extra`` parameters. It builds each config and calls
    ``run(*configs, **extra_values)``; a class in ``partial`` is passed as the dict of the
    values given instead (fields marked ``fallback`` default to ``None`` there: the caller
    fills them, e.g. from a training recipe)."""
    classes = [configs] if isinstance(configs, type) else list(configs)
    params: list[inspect.Parameter] = []
    parsers: dict[str, Any] = {}
    owner: dict[str, type] = {}
    defaults: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            if f.name in owner:
                raise TypeError(f"option {f.name!r} is declared by {owner[f.name].__name__} "
                                f"and {cls.__name__}")
            owner[f.name] = cls
            parse = f.metadata.get("parse")
            fallback = cls in partial and f.metadata.get("fallback")
            default, hint, help_text = f.default, hints[f.name], f.metadata.get("help", "")
            if isinstance(default, Enum):  # text on the command line, the enum's value
                default, hint = default.value, str
                parse = parse or functools.partial(parse_choice, type(f.default),
                                                   what=f.name.replace("_", " "))
            elif parse is not None:  # text parsed into the value; left out: the field's
                default, hint = None, str | None
            if fallback:
                default, hint = None, _optional(hint)
                help_text += f" (default: {fallback})"
            parsers[f.name], defaults[f.name] = parse, f.default
            flag = f"--{f.name.replace('_', '-')}"
            if bool in (hint, *typing.get_args(hint)):  # a default of True can be turned off
                flag = f"{flag}/--no-{flag[2:]}"
            decls = (flag, *f.metadata.get("aliases", ()))
            params.append(option_param(
                f.name, Annotated[hint, typer.Option(*decls, help=help_text)], default))
    extra_names = [p.name for p in extra]

    def command(**kwargs: Any) -> None:
        rest = {name: kwargs.pop(name) for name in extra_names}
        built: list[Any] = []
        for cls in classes:
            values = {k: (parsers[k](v) if parsers[k] is not None and v is not None else v)
                      for k, v in kwargs.items() if owner[k] is cls}
            if cls in partial:
                built.append({k: v for k, v in values.items() if v is not None})
            else:  # a None the field does not default to means "left out"
                built.append(cls(**{k: v for k, v in values.items()
                                    if v is not None or defaults[k] is None}))
        run(*built, **rest)

    all_params = params + extra
    command.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in all_params}
    command.__doc__ = run.__doc__
    command.__configs__ = (tuple(classes), tuple(partial))  # type: ignore[attr-defined]
    return command


def with_configs(**configs: type) -> Callable[[Callable[..., Any]], Callable[..., None]]:
    """Decorate a typer command whose parameters ``NAME: CLASS`` are config dataclasses: the
    command's options become its own parameters plus every field of those classes (built by
    :func:`config_command`, so each default and help is declared once, on the field), and the
    command receives each config built."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., None]:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
               for p in inspect.signature(fn).parameters.values() if p.name not in configs]
        own_names = [p.name for p in own]
        names = list(configs)

        def run(*built: Any, **rest: Any) -> None:
            fn(**rest, **dict(zip(names, built, strict=True)))

        run.__doc__ = fn.__doc__
        command = config_command(tuple(configs.values()), run, own)
        command.__name__ = fn.__name__
        assert set(own_names) <= set(command.__annotations__)
        return command

    return decorate


def _optional(hint: Any) -> Any:
    return hint | None if hint is not type(None) else hint


def option_param(name: str, annotation: Any,
                 default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def field_help(cls: type, name: str) -> str:
    """The help text declared on field ``name`` of config class ``cls``."""
    return str(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"])
