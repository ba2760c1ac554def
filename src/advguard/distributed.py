"""torch.distributed, the way torchrun launches it: every command runs unchanged under
``torchrun --nproc_per_node=N`` (and ``--nnodes`` with a rendezvous endpoint).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins the process
group (gloo on CPU, nccl when the device is CUDA). Two ways to use the ranks:

* **one training together** — the training loop wraps the model in
  ``DistributedDataParallel``, each rank takes its share of every batch and crafts its
  adversarial copies against the synchronised model (:mod:`advguard.training.loop`);
* **independent work spread over ranks** — :func:`spread` runs item ``i`` on rank
  ``i mod N`` and gives every rank all the results (the accuracy matrix's rows, parallel MAT's
  members).

Rank 0 alone logs and writes shared results; :func:`is_main` says which rank that is.

A rank that fails says so (:func:`report_failure`, called by the command line on any error):
its message goes to the process group's store, and every other rank, whose watcher thread
polls the store, stops at once with that message instead of waiting in a collective for the
rank that will never come (torchrun stops the workers of one node itself; the store reaches
every node).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from advguard.errors import InputError

T = TypeVar("T")
log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(hours=12)  # rank 0 may evaluate for long while the others wait
FAILED = "advguard/failed"  # the store key a failing rank writes its error under
POLL_S = 0.5  # how often each rank looks for another's failure


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "cpu") -> None:
    """Join the process group torchrun describes (no-op for a single process)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"cannot join the torchrun process group ({backend}): "
                         f"{str(exc).splitlines()[0]}") from None
    log.info("rank %d of %d (%s)", rank(), world_size(), backend)
    atexit.register(_close, _watch_peers())


def _close(watcher: tuple[threading.Thread, threading.Event]) -> None:
    """At exit: stop the watcher thread, then leave the process group. A process that
    left it to the interpreter's shutdown could abort ("terminate called without an active
    exception") while the watcher was inside a store call."""
    thread, stop = watcher
    stop.set()
    thread.join(timeout=5 * POLL_S)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing is left to release
            log.debug("process group already torn down")


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


def report_failure(message: str) -> None:
    """Tell the other ranks that this one failed, with ``message``: they stop with it."""
    if not active():
        return
    try:
        _store().set(FAILED, f"rank {rank()}: {' '.join(message.split())}")
    except Exception:  # noqa: BLE001 - the store is gone: the run is ending anyway
        return
    time.sleep(2 * POLL_S)  # the others read it before this exit takes the store down


def _watch_peers() -> tuple[threading.Thread, threading.Event]:
    """A daemon thread that ends this process, with the failing rank's message, once another
    rank reports a failure; it stops when the returned event is set."""
    store, me, stop = _store(), f"rank {rank()}:", threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_S):
            try:
                if not store.check([FAILED]):
                    continue
                message = store.get(FAILED).decode()
            except Exception:  # noqa: BLE001 - the store is gone: the run is ending
                return
            if message.startswith(me):
                return
            sys.stderr.write(f"error: stopping this rank: {message}\n")
            sys.stderr.flush()
            os._exit(1)

    thread = threading.Thread(target=watch, name="advguard-peer-watch", daemon=True)
    thread.start()
    return thread, stop


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device_for_rank(device: str) -> str:
    """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if active() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def spread(items: Sequence[Any], fn: Callable[[Any], T]) -> list[T]:
    """``[fn(item) for item in items]`` with item ``i`` computed on rank ``i mod N``; every
    rank returns the whole list (results travel as pickled objects over the process group)."""
    if not active():
        return [fn(item) for item in items]
    mine = {i: fn(item) for i, item in enumerate(items) if i % world_size() == rank()}
    gathered: list[dict[int, T] | None] = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    merged: dict[int, T] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[i] for i in range(len(items))]


def gather_all(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_only(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 while the others wait; every rank gets its result."""
    if not active():
        return fn()
    box: list[Any] = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
