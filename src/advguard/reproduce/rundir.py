"""A run directory: ``config.json`` pinned once and checked on every resume, and the one way a
stage's result is cached in ``checkpoints/`` (computed once, written atomically, read back on a
resumed run).

Under torchrun every rank runs the same stages. A stage says who computes it: ``"all"`` (the
ranks together, e.g. a DistributedDataParallel training; rank 0 writes), ``"main"`` (rank 0
alone, e.g. an evaluation; the others wait and read its file) or ``"self"`` (this rank alone,
for work spread over ranks with :func:`advguard.distributed.spread`). The run directory must
then be on a filesystem every rank sees."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import nn

from advguard import distributed
from advguard.ensemble import VotingEnsemble, load_ensemble, save_ensemble
from advguard.errors import CheckpointError
from advguard.io import (
    check_output,
    hold_lock,
    load_array,
    load_tensors,
    read_json,
    save_array,
    save_tensors,
    write_json,
)
from advguard.models import load_model, save_model
from advguard.options import as_json

T = TypeVar("T")
Saved = tuple[nn.Module, dict[str, Any]]  # a module and the metadata saved with it


Who = Literal["all", "main", "self"]


class _Config(Protocol):
    def resolve(self) -> Any: ...


class RunDir:
    """``root/config.json`` and the stages under ``root/checkpoints/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.ckpt = self.root / "checkpoints"
        self._alone = 0  # > 0 while this rank computes a stage by itself

    def pin(self, config: Any) -> None:
        """Fix ``config`` (resolved) in ``config.json``; a different stored config is an error
        once any stage has been stored, so a resumed run never mixes two experiments (a run
        that failed before storing anything is simply replaced). Fields the config names in
        ``report_only`` choose what is reported from the stored stages, not what they hold:
        they may differ."""
        stored = self.root / "config.json"
        current = as_json(config)
        free = set(getattr(config, "report_only", ()))
        if stored.exists() and self.has_work():
            old = read_json(stored)
            diff = sorted(k for k, v in current.items() if old.get(k) != v and k not in free)
            if diff:
                raise CheckpointError(
                    f"{self.root} holds a run with a different configuration "
                    f"({', '.join(diff)}); use another --out, or the same options to resume it")
        if distributed.is_main():
            write_json(stored, current)
        distributed.barrier()

    def has_work(self) -> bool:
        """Whether any stage, finished or in training, is stored."""
        return self.ckpt.is_dir() and any(self.ckpt.iterdir())

    def path(self, name: str) -> Path:
        return self.ckpt / name

    def cached(self, name: str, compute: Callable[[], T], save: Callable[[Path, T], object],
               load: Callable[[Path], T], *, valid: Callable[[T], bool] | None = None,
               cleanup: Iterable[str] = (), who: Who = "all") -> T:
        """``load`` the stage ``name`` if it is stored (and ``valid``), else ``compute`` it,
        ``save`` it and delete the ``cleanup`` files (e.g. the training state it resumed).
        ``who`` computes it under torchrun (module docstring)."""
        path = self.path(name)

        def stored() -> T | None:
            if path.exists():
                value = load(path)
                if valid is None or valid(value):
                    return value
            return None

        alone = who == "self" or self._alone > 0 or not distributed.active()
        if alone:  # no collective: this rank works by itself here
            found = stored()
        else:  # rank 0 decides, so that every rank takes the same branch (and barriers)
            found = stored() if distributed.main_only(lambda: stored() is not None) else None
        if found is not None:
            return found
        writer = alone or distributed.is_main()
        if who == "main" and not writer:
            distributed.barrier()  # rank 0 computes and writes; then read its file
            return load(path)
        solo = who != "all"  # one rank alone: the stages it asks for must not start
        self._alone += solo  # collectives (the callers compute them on every rank first)
        try:
            value = compute()
        finally:
            self._alone -= solo
        if writer:
            save(path, value)
            for other in cleanup:
                self.path(other).unlink(missing_ok=True)
        if not alone:
            distributed.barrier()
        return value

    def json(self, name: str, compute: Callable[[], Any], *,
             valid: Callable[[Any], bool] | None = None, who: Who = "all") -> Any:
        return self.cached(f"{name}.json", compute, write_json, read_json, valid=valid, who=who)

    def tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        return self.cached(f"{name}.safetensors", compute, save_tensors,
                           lambda p: load_tensors(p)[0])

    def array(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A fixed array kept as ``name.npy`` and read back memory-mapped (not held in RAM)."""
        return self.cached(f"{name}.npy", compute, save_array, load_array)

    def model(self, name: str, compute: Callable[[], Saved], *,
              cleanup: Iterable[str] = ()) -> Saved:
        """A trained model and its metadata (``arch`` and ``dataset`` among them)."""
        def save(path: Path, saved: Saved) -> None:
            save_model(path, saved[0], **saved[1])
        return self.cached(f"{name}.safetensors", compute, save, load_model, cleanup=cleanup)

    def ensemble(self, name: str, compute: Callable[[], tuple[VotingEnsemble, dict[str, Any]]],
                 *, cleanup: Iterable[str] = ()) -> tuple[VotingEnsemble, dict[str, Any]]:
        def save(path: Path, saved: tuple[VotingEnsemble, dict[str, Any]]) -> None:
            save_ensemble(path, saved[0], **saved[1])
        return self.cached(f"{name}.safetensors", compute, save, load_ensemble, cleanup=cleanup)



@contextmanager
def open_run(config: _Config, out: str | Path) -> Iterator[tuple[Any, RunDir]]:
    """Resolve ``config`` (every value checked before any work), lock the run directory
    ``out`` against a second process and pin the config in it: ``(resolved config, run)``."""
    resolved = config.resolve()
    check_output(out, directory=True)
    run = RunDir(out)
    lock = (hold_lock(run.root / ".lock", f"run directory {run.root}") if distributed.is_main()
            else contextlib.nullcontext())
    with lock:
        run.pin(resolved)
        yield resolved, run
