"""A run directory's ``config.json``: written once, and checked on every resume."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from advguard.errors import CheckpointError
from advguard.io import read_json, write_json


class _Config(Protocol):
    def resolved(self) -> Any: ...


C = TypeVar("C", bound=_Config)


def prepare_run_dir(config: C, out: str | Path) -> C:
    """Resolve ``config`` (a dataclass with ``resolved()``) and fix it in ``out/config.json``; a
    different stored config is an error, so a resumed run never mixes two experiments."""
    cfg = config.resolved()
    stored = Path(out) / "config.json"
    current = asdict(cfg)
    if stored.exists():
        old = read_json(stored)
        diff = sorted(k for k, v in current.items() if old.get(k) != v)
        if diff:
            raise CheckpointError(
                f"{out} holds a run with a different configuration ({', '.join(diff)}); "
                "use another --out, or the same options to resume it")
    write_json(stored, current)
    return cfg
