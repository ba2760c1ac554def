"""One way to write results and checkpoints: atomically, so a crash never leaves half a file.

Model weights are stored as safetensors (loading executes no code); training state that holds
optimizer moments is stored with ``torch.save`` and read back with ``weights_only=True``; large
fixed arrays (the transfer setting's FGSM directions) as ``.npy`` files read back
memory-mapped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from advguard.errors import CheckpointError, InputError


def check_output(path: str | Path, *, directory: bool = False) -> Path:
    """Refuse, before any work starts, an output path that cannot be written: a file path that
    is a folder (or a folder path that is a file), or one below a file or a read-only folder."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise InputError(f"output {path} is a {'file' if directory else 'directory'}; give a "
                         f"{'directory' if directory else 'file'} path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create output {path}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot create output {path}: {ancestor} is not writable")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB pieces): what a result was measured on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """The sha256 of a module's parameters and buffers (names, dtypes, shapes, values): the
    same for the same weights whatever file they came from."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt JSON file {path}: {exc.msg} (line {exc.lineno})") from None


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors; ``metadata`` values are stored JSON-encoded."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a safetensors file written by :func:`save_tensors` (header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"corrupt or truncated checkpoint {path}: {str(exc).splitlines()[0]}"
        ) from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`: ``(tensors, metadata)``."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"corrupt or truncated checkpoint {path}: {str(exc).splitlines()[0]}"
        ) from None
    return tensors, meta


def save_array(path: str | Path, tensor: torch.Tensor) -> Path:
    """Write a tensor as a ``.npy`` file (atomically), to be read by :func:`load_array`."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, tensor.detach().cpu().numpy())
    return atomic_write(path, write)


def load_array(path: str | Path) -> torch.Tensor:
    """A ``.npy`` file memory-mapped (copy-on-write: the file is never changed): rows are read
    from disk when they are indexed, so an array larger than RAM can be used."""
    try:
        return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or truncated array {path}: "
                              f"{str(exc).splitlines()[0]}") from None


def save_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Save a training state (model/optimizer state dicts, counters) for resuming."""
    return atomic_write(path, lambda p: torch.save(dict(state), p))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zip files
        raise CheckpointError(
            f"corrupt or truncated training state {path}: {str(exc).splitlines()[0]}"
        ) from None


@contextmanager
def hold_lock(path: str | Path, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` while the block runs, so two processes never write
    one output at once; if another process holds it, an :class:`InputError` names the holder.
    ``what`` names the output in the message (default: the lock's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise InputError(f"{what or path.parent} is in use by {holder}; wait for that run to "
                         "finish, or use another output") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
