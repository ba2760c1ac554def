"""The one training loop, parameterised by a :class:`StrengthMix`: any map-style Dataset of
``(image, label)`` (in-memory :class:`~advguard.data.ImageSet`, a streamed image folder, a
user's own) or a DataLoader, read batch by batch (:func:`advguard.data.batches`); Adam or SGD
with momentum; optional mixed precision and gradient clipping.

Resumable: with ``state_path`` the model, optimiser and history are saved atomically after every
epoch and a later call continues from there. Each epoch's shuffle comes from ``seed + epoch``, so
a resumed run visits the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard import distributed as distributed_
from advguard.data import FlipCrop, ImageSet, as_dataset, batches, info_of, near_copy
from advguard.errors import CheckpointError, InputError
from advguard.io import load_state, save_state
from advguard.models import accuracy
from advguard.models.inference import check_takes
from advguard.options import plain
from advguard.training.batchnorm import refresh_batchnorm, stale_batchnorm
from advguard.training.config import (
    OPTIONAL,
    TrainConfig,
    optimizer_for,
    precision,
    scheduler,
)
from advguard.training.losses import batch_loss
from advguard.training.mixing import StrengthMix
from advguard.training.sources import AdversarialSource, WhiteBox

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    seconds: float = 0.0  # wall time spent training, summed over resumed sessions
    # BatchNorm layers re-estimated at the end, because one was stale (.batchnorm)
    refreshed_batchnorm: list[str] = field(default_factory=list)


def train(model: nn.Module, data: Any, mix: StrengthMix = StrengthMix(),
          source: AdversarialSource | None = None,
          config: TrainConfig | None = None, *,
          val: Any = None, state_path: str | Path | None = None,
          pin: Mapping[str, Any] | None = None, progress: bool = True,
          desc: str = "train", distributed: bool = True,
          workers: int | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` mixed by ``mix`` (SPEC A3); returns its history.

    ``data`` and ``val``: any map-style Dataset of ``(image in [0, 1], label)`` or a DataLoader
    (its dataset and workers are used; the order is the loop's), read batch by batch with
    ``workers`` DataLoader workers (default: the DataLoader's, or none). Peak memory does not
    grow with the dataset: only the epoch's shuffled row order is held.

    ``source`` (where adversarial copies come from) defaults to white-box FGSM on ``model``
    itself. Random draws (sampled strengths, random starts) come from torch's global generator,
    seeded with ``config.seed`` and saved with every epoch's state, so a resumed run draws what
    an uninterrupted one would. The state also records what is being trained (the config, the
    mix, the source and the caller's ``pin``, e.g. architecture and data); a state left by a
    different run is refused instead of being continued.

    Under torchrun (``distributed=True`` and more than one process) the ranks train ``model``
    together: it is wrapped in ``DistributedDataParallel``, every epoch's shuffle is split
    over the ranks (padded to equal shares), each rank takes ``batch_size / N`` clean examples
    a step and crafts their adversarial copies against the synchronised model, and rank 0
    alone saves the state. Random draws are then seeded per epoch and rank, so a state resumes
    with any number of processes. ``distributed=False`` trains this rank's model alone (work
    spread over ranks).
    """
    run = _Run.start(model, data, mix, source or WhiteBox(), config or TrainConfig(),
                     distributed, workers, pin)
    result, start_epoch = _resume(run, state_path, desc)
    for epoch in range(start_epoch, run.config.epochs):
        t0 = time.perf_counter()
        loss = _epoch(run, epoch, progress, desc)
        row: dict[str, float] = {"epoch": epoch + 1, "loss": loss}
        if val is not None and len(val):
            evaluated = model if run.averaged is None else run.averaged.module
            row["val_accuracy"] = (accuracy(evaluated, val.x, val.y, device=run.device)
                                   if isinstance(val, ImageSet)
                                   else accuracy(evaluated, val, device=run.device))
        result.seconds += time.perf_counter() - t0
        row["seconds"] = result.seconds
        result.history.append(row)
        if run.rank == 0:
            log.info("%s epoch %d/%d: loss %.4f, validation accuracy %s (%.1f s)", desc,
                     epoch + 1, run.config.epochs, row["loss"],
                     f"{row['val_accuracy']:.4f}" if val else "-", result.seconds)
        if state_path is not None and run.rank == 0:
            _save(run, state_path, epoch + 1, result)
        if run.world > 1:
            torch.distributed.barrier()  # the state is written before any rank goes on
    # judged on the trained model's own update counts (a weight average's are averaged too)
    stale = stale_batchnorm(model)
    if run.averaged is not None:
        model.load_state_dict(run.averaged.module.state_dict())
    if stale:
        result.refreshed_batchnorm = refresh_batchnorm(
            model, run.dataset, stale, batch_size=run.config.batch_size, workers=run.workers,
            device=run.device, rank=run.rank, world=run.world)
    if run.config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return result


@dataclass
class _Run:
    """What every step of one training run uses: the model (and its DDP wrapper), optimiser,
    schedule, precision, weight average, the data and how it is split over the ranks."""

    model: nn.Module
    net: nn.Module
    config: TrainConfig
    mix: StrengthMix
    source: AdversarialSource
    dataset: Any
    workers: int
    info: Any
    batch_augment: bool
    device: torch.device
    layout: torch.memory_format
    world: int
    rank: int
    opt: torch.optim.Optimizer
    sched: Any
    autocast: Any
    scaler: Any
    averaged: Any
    per_rank: int
    share: int
    steps: int
    identity: dict[str, Any]
    groups: Any

    @staticmethod
    def start(model: nn.Module, data: Any, mix: StrengthMix, source: AdversarialSource,
              config: TrainConfig, distributed: bool, workers: int | None,
              pin: Mapping[str, Any] | None) -> _Run:
        if config.paired and mix.strengths and (mix.clean or (len(mix.strengths) > 1
                                                              and not mix.sample)):
            raise InputError(f"the {'TRADES' if config.trades_beta else 'MART'} loss pairs "
                             "each image with one adversarial copy: train on adversarial "
                             "copies only, one strength or strengths sampled per example")
        dataset, loader_workers = as_dataset(data)
        info = info_of(dataset)
        if getattr(dataset, "augments", False) and not isinstance(source, WhiteBox):
            raise InputError("the transfer setting's fixed directions cannot follow a "
                             "dataset's own random crops: train it without augmentation")
        world = distributed_.world_size() if distributed else 1
        rank = distributed_.rank() if world > 1 else 0
        device = torch.device(distributed_.device_for_rank(config.device) if world > 1
                              else config.device)
        model.to(device)
        if info is not None:
            check_takes(model, info.shape, info.num_classes, device)
        layout = torch.channels_last if config.channels_last else torch.contiguous_format
        if config.channels_last:
            model.to(memory_format=layout)
        net: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
        opt = optimizer_for(model, config)
        autocast, scaler = precision(config, device)
        n = len(dataset)
        per_rank = config.batch_size if world == 1 else max(1, config.batch_size // world)
        share = -(-n // world)  # examples per rank and epoch (the shuffle padded to N shares)
        steps = -(-share // per_rank)
        torch.manual_seed(config.seed)
        return _Run(model, net, config, mix, source, dataset,
                    loader_workers if workers is None else workers, info,
                    # a dataset that crops and flips its own images gets no more
                    config.augment and not getattr(dataset, "augments", False), device, layout,
                    world, rank, opt, scheduler(opt, config, steps), autocast, scaler,
                    _averaged(model, config.average), per_rank, share, steps,
                    _identity(config, mix, source, pin), mix.groups(n, config.seed))


def _resume(run: _Run, state_path: str | Path | None, desc: str) -> tuple[TrainResult, int]:
    """The history so far and the epoch to start at: a saved state loaded into the run."""
    if state_path is None or not Path(state_path).exists():
        return TrainResult(), 0
    state = load_state(state_path)
    _check_identity(state_path, state.get("identity"), run.identity)
    try:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        if run.sched is not None and state.get("steps_per_epoch", run.steps) == run.steps:
            run.sched.load_state_dict(state["scheduler"])
        elif run.sched is not None:  # another world size: the schedule at the same epoch
            for _ in range(start * run.steps):
                run.sched.step()
        if "rng" in state and run.world == 1:
            torch.set_rng_state(state["rng"])
        if run.averaged is not None:
            run.averaged.load_state_dict(state["averaged"])
        if "scaler" in state:  # fp16: the loss scale it had reached
            run.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"training state {state_path} does not fit this model: "
                              f"{str(exc).splitlines()[0]}") from None
    log.info("%s: resuming after epoch %d", desc, start)
    return TrainResult(list(state["history"]), float(state["seconds"])), start


def _epoch(run: _Run, epoch: int, progress: bool, desc: str) -> float:
    """One epoch over this rank's share of the shuffle; the mean loss over all ranks."""
    config, n = run.config, len(run.dataset)
    run.model.train()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
    if run.world > 1:
        order = order.repeat(-(-run.share * run.world // n))[:run.share * run.world][
            run.rank::run.world]
        torch.manual_seed(config.seed + 1_000_003 * (epoch + 1) + run.rank)
    loss_sum, seen = 0.0, 0
    rows = order.split(run.per_rank)
    bar = tqdm(batches(run.dataset, rows, workers=run.workers,
                       pin_memory=run.device.type == "cuda",
                       seed=config.seed + 1_000_003 * epoch + run.rank),
               total=len(rows), desc=f"{desc} {epoch + 1}/{config.epochs}",
               disable=not progress or run.rank > 0, leave=False)
    for i, (x, y, index) in enumerate(bar):
        loss = _step(run, x, y, index, config.strength_scale(
            epoch * run.steps + i, config.epochs * run.steps))
        loss_sum += loss * len(index)
        seen += len(index)
    if run.world > 1:
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(totals)
        loss_sum, seen = float(totals[0]), int(totals[1])
    return loss_sum / max(seen, 1)


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
          scale: float) -> float:
    """One optimiser step on a batch: augment, craft its adversarial copies against the
    synchronised model (in float32), the recipe's loss, the update; the loss's value."""
    config = run.config
    x = x.to(run.device, memory_format=run.layout, non_blocking=True)
    y = y.to(run.device, non_blocking=True)
    augment = (FlipCrop.draw(x, flip=run.info is not None and run.info.flips)
               if run.batch_augment else None)
    if augment is not None:
        x = augment(x).contiguous(memory_format=run.layout)
    xb, yb = run.mix.batch(run.model, x, y, index, run.source, run.groups, scale=scale,
                           augment=augment)
    near = (near_copy(x, most=config.stability_move, sigma=config.stability_noise)
            .contiguous(memory_format=run.layout) if config.stability else None)
    with run.autocast():
        loss = batch_loss(run.net, x, y, xb, yb, trades_beta=config.trades_beta,
                          mart_beta=config.mart_beta, adversarial=bool(run.mix.strengths),
                          label_smoothing=config.label_smoothing, near=near,
                          stability=config.stability, clean_first=run.mix.clean_first)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.clip_grad > 0:
        run.scaler.unscale_(run.opt)
        nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_grad)
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.sched is not None:
        run.sched.step()
    if run.averaged is not None:
        run.averaged.update_parameters(run.model)
    return float(loss.detach())


def _save(run: _Run, state_path: str | Path, epoch: int, result: TrainResult) -> None:
    save_state(state_path, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
        "history": result.history, "seconds": result.seconds, "identity": run.identity,
        "scheduler": None if run.sched is None else run.sched.state_dict(),
        "steps_per_epoch": run.steps, "rng": torch.get_rng_state(),
        **({} if run.averaged is None else {"averaged": run.averaged.state_dict()}),
        **({"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {})})


def _averaged(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (``decay`` per step),
    torch's :class:`~torch.optim.swa_utils.AveragedModel`; ``None`` when ``decay`` is 0."""
    if decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)



def _identity(config: TrainConfig, mix: StrengthMix, source: AdversarialSource,
              pin: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a training state belongs to, as plain values (the state is read weights-only)."""
    attack = getattr(source, "attack", None)
    # options added later are named only when on (older states lack them)
    defaults = asdict(TrainConfig())
    fields = {k: v for k, v in asdict(config).items()
              if k != "device" and not (k in OPTIONAL and v == defaults[k])}
    return {**{k: plain(v) for k, v in fields.items()},
            "strengths": list(mix.strengths), "reduced": mix.reduced, "sample": mix.sample,
            "clean": mix.clean,
            "source": type(source).__name__ + (f":{type(attack).__name__}" if attack else ""),
            **{k: plain(v) for k, v in (pin or {}).items()}}


def _check_identity(path: str | Path, stored: Any, current: dict[str, Any]) -> None:
    if stored is None:  # states written before identities were recorded
        return
    diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if diff:
        raise CheckpointError(f"{path} is the state of a different training run "
                              f"({', '.join(diff)} differ); delete it to start afresh, or give "
                              "the options it was started with to resume it")
