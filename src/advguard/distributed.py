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
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from advguard.errors import InputError

T = TypeVar("T")
log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(hours=12)  # rank 0 may evaluate for long while the others wait


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


def main_only(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 while the others wait; every rank gets its result."""
    if not active():
        return fn()
    box: list[Any] = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
