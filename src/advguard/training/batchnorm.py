"""BatchNorm running averages that training has not made usable, re-estimated at its end.

A BatchNorm layer normalises a training batch by the batch's own statistics and an input at
test time by running averages kept during training: ``(1 − momentum)`` of the old value plus
``momentum`` of the batch's, starting from mean 0 and variance 1. With a small momentum and few
updates the averages still hold much of those starting values and lag far behind the weights:
torchvision's MobileNetV3 (momentum 0.01) trained for 360 steps on 3,000 224×224 images
answered one class for every test image in eval mode (10.0%) while the same weights with batch
statistics answered 7 of 10 right; one pass over the training images without gradients
(torch's :func:`~torch.optim.swa_utils.update_bn`, which averages every batch equally) gave
46.8% on 1,000 test images. A model none of whose layers is stale (trained long enough for
its momentum: 0.1 forgets its start in 44 updates) is left as trained; once one layer is
stale, every BatchNorm layer is re-estimated (one pass serves them all). The pass reads the
clean training images: a model trained on adversarial copies too had its averages taken over
the mix, which a stale average never reflected either.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from advguard.data import batches, fitting_batch

# a layer's running averages are stale while their starting values still weigh more than this
# share: (1 − momentum) ** updates (momentum 0.1: 44 updates; 0.01: 459)
STALE_WEIGHT = 0.01

log = logging.getLogger(__name__)


def stale_batchnorm(model: nn.Module) -> list[str]:
    """The BatchNorm layers of ``model`` whose running averages still hold more than
    ``STALE_WEIGHT`` of their starting values (layers averaging every batch equally, with
    ``momentum=None``, are never stale once they have seen one)."""
    out = []
    for name, m in _batchnorm(model):
        updates = int(m.num_batches_tracked)  # type: ignore[arg-type]
        if (updates == 0 if m.momentum is None  # a cumulative average: its start weighs 0
                else (1.0 - m.momentum) ** updates > STALE_WEIGHT):
            out.append(name)
    return out


def _batchnorm(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.num_batches_tracked is not None]


def refresh_batchnorm(model: nn.Module, dataset: Any, stale: list[str], *, batch_size: int,
                      workers: int, device: torch.device, rank: int = 0,
                      world: int = 1) -> list[str]:
    """Re-estimate the running averages of every BatchNorm layer of ``model`` over ``dataset``
    (one pass in train mode without gradients; the weights do not change), the ``stale``
    layers (:func:`stale_batchnorm`) named in the log; returns the layers re-estimated.

    Under torchrun (``world`` > 1, every rank calling) each rank passes over its share of the
    images (every ``world``-th from ``rank``) and the ranks' averages are combined, weighted by
    their batches: every batch of every rank weighs alike, as in one process's pass, and every
    rank ends with the same averages (before, each passed over every image and, with a
    self-augmenting dataset, each kept averages of its own crops)."""
    first = dict(model.named_modules())[stale[0]]
    log.info("BatchNorm: %d layer(s) still held more than %g of their starting averages "
             "after %d updates (momentum %s): re-estimating every BatchNorm layer over the %d "
             "training images", len(stale), STALE_WEIGHT, int(first.num_batches_tracked),
             first.momentum, len(dataset))
    size = fitting_batch(dataset, batch_size)
    mine = torch.arange(rank, len(dataset), world)
    rows = [mine[s:s + size] for s in range(0, len(mine), size)]
    images = (x for x, _, _ in batches(dataset, rows, batch_size=size, workers=workers))
    torch.optim.swa_utils.update_bn(images, model, device)  # it moves each batch to device
    if world > 1:
        _combine(model, len(rows))
    return [name for name, _ in _batchnorm(model)]


def _combine(model: nn.Module, passed: int) -> None:
    """Every rank's running averages replaced by the average over all ranks' batches (each
    rank's average weighted by the ``passed`` batches it took)."""
    import torch.distributed as dist

    layers = [m for _, m in _batchnorm(model)]
    assert layers[0].num_batches_tracked is not None  # _batchnorm keeps only such layers
    total = torch.tensor([passed], dtype=torch.float64,
                         device=layers[0].num_batches_tracked.device)
    dist.all_reduce(total)  # the batches of every rank, the same for every layer
    for m in layers:
        assert m.num_batches_tracked is not None
        for buf in (m.running_mean, m.running_var):
            if buf is not None:
                buf.mul_(passed)
                dist.all_reduce(buf)
                buf.div_(float(total))
        m.num_batches_tracked.fill_(int(total))
