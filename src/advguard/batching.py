"""One way to walk a dataset in batches: slices with an optional progress bar, and a map over
batches that moves each one to the device and gathers the results on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm


def batch_slices(n: int, batch_size: int, *, progress: bool = False,
                 desc: str = "batches") -> Iterator[slice]:
    """``slice(s, s + batch_size)`` over ``range(n)``, with a progress bar if asked."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield slice(s, s + batch_size)


def map_batches(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 1000,
                device: str | torch.device = "cpu", progress: bool = False,
                desc: str = "batches") -> torch.Tensor:
    """``fn(*batch)`` on every batch of ``tensors`` (moved to ``device``), concatenated on the
    CPU. All tensors are sliced alike along their first dimension."""
    n = len(tensors[0])
    out = [fn(*(t[sl].to(device) for t in tensors)).detach().cpu()
           for sl in batch_slices(n, batch_size, progress=progress, desc=desc)]
    return torch.cat(out)
