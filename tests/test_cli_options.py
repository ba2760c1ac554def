"""Every command-line option built from a config dataclass says what its field says: the same
default and the same help (declared once, on the field)."""

from __future__ import annotations

import dataclasses
from enum import Enum

import pytest
import typer

from advguard.cli import app


def _commands(group: typer.Typer, prefix: str = "") -> list[tuple[str, object]]:
    found = [(f"{prefix}{c.name or c.callback.__name__}", c.callback)
             for c in group.registered_commands]
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, f"{prefix}{sub.name} ")
    return found


BUILT = [(name, cb) for name, cb in _commands(app) if hasattr(cb, "__configs__")]


def test_the_commands_that_take_data_and_models_build_their_options_from_fields():
    assert {name for name, _ in BUILT} >= {"train", "evaluate", "audit", "predict",
                                           "guard fit", "serve", "reproduce mat",
                                           "reproduce detect"}


def _expected_default(field: dataclasses.Field, fallback: bool) -> object:
    if field.metadata.get("parse") is not None or fallback:
        return None
    return field.default.value if isinstance(field.default, Enum) else field.default


@pytest.mark.parametrize(("name", "callback"), BUILT, ids=[n for n, _ in BUILT])
def test_each_option_has_its_fields_default_and_help(name, callback):
    command = typer.main.get_command(app)
    for word in name.split():
        command = command.commands[word]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    classes, partial = callback.__configs__
    checked = 0
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            fallback = cls in partial and bool(f.metadata.get("fallback"))
            param = params[f.name]
            assert param.default == _expected_default(f, fallback), (name, f.name)
            assert param.help.startswith(f.metadata["help"]), (name, f.name)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize(("name", "callback"), BUILT, ids=[n for n, _ in BUILT])
def test_every_switch_can_be_turned_off(name, callback):
    """A switch defaulting to on (``reproduce detect --mat``) must have its ``--no-`` form."""
    command = typer.main.get_command(app)
    for word in name.split():
        command = command.commands[word]  # type: ignore[attr-defined]
    for param in command.params:
        if getattr(param, "is_flag", False) and param.default is True:
            assert param.secondary_opts == [f"--no-{param.name.replace('_', '-')}"], param.name


def test_the_operating_point_is_declared_once():
    """keep = 98% lives in evaluation.detection.KEEP; the options, every registered detector
    and the evaluation helper take it from there (a restated 0.98 would drift)."""
    import inspect

    from advguard.detection import DETECTORS
    from advguard.evaluation.detection import KEEP, operating_point
    from advguard.reproduce.detect.config import DetectConfig
    from advguard.serve.guard import GuardFit

    assert GuardFit.keep == DetectConfig.keep == KEEP
    assert inspect.signature(operating_point).parameters["keep"].default == KEEP
    for name, cls in DETECTORS.items():
        assert inspect.signature(cls.__init__).parameters["keep"].default == KEEP, name
