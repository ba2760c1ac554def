"""The one training loop: Adam over in-memory tensors, parameterised by a :class:`StrengthMix`.

Resumable: with ``state_path`` the model, optimiser and history are saved atomically after every
epoch and a later call continues from there. Each epoch's shuffle comes from ``seed + epoch``, so
a resumed run visits the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advguard import distributed as distributed_
from advguard import options
from advguard.data import FlipCrop, ImageSet
from advguard.errors import CheckpointError, InputError
from advguard.io import load_state, save_state
from advguard.models import accuracy
from advguard.options import plain
from advguard.training.mixing import StrengthMix
from advguard.training.sources import AdversarialSource, WhiteBox

log = logging.getLogger(__name__)


# TrainConfig fields added later: a state names them only when they are on
OPTIONAL = ("ramp", "average", "augment", "label_smoothing", "channels_last")


class Schedule(str, Enum):
    CONSTANT = "constant"
    ONE_CYCLE = "one-cycle"  # 0 -> lr -> 0, linear (Wong et al. 2020)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the clean training set
    batch_size: int = 128  # clean examples per step (the mixed batch holds (S+1)x as many)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0
    seed: int = 0  # shuffling, reduced-size groups, sampled strengths and random starts
    device: str = "cpu"
    schedule: Schedule = Schedule.CONSTANT  # learning rate over the run
    ramp: float = 0.0  # strengths rise linearly from 0 over this fraction of the steps
    average: float = 0.0  # EMA decay of the weights per step (0: off); the model ends averaged
    augment: bool = False  # random crop (+ flip where the dataset allows) of every clean batch
    label_smoothing: float = 0.0  # of the cross-entropy loss
    channels_last: bool = False  # NHWC weights and batches (faster convolutions on CPUs)

    def __post_init__(self) -> None:
        options.check_at_least(self, 1, "epochs", "batch_size")
        options.check_positive("lr", self.lr)
        options.device(self.device)
        if not self.weight_decay >= 0:
            raise InputError(f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        for name in ("ramp", "average", "label_smoothing"):
            options.check_below_one(name, getattr(self, name))
        self.schedule = Schedule(self.schedule)

    def strength_scale(self, step: int, steps: int) -> float:
        """The fraction of every strength used at global ``step`` of ``steps`` (the ε ramp)."""
        return 1.0 if self.ramp == 0 else min(1.0, (step + 1) / (self.ramp * steps))


def _scheduler(opt: torch.optim.Optimizer, config: TrainConfig,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step learning-rate schedule: "one-cycle" rises linearly from ~0 to ``lr`` over the
    first 40% of the steps and falls back to ~0 (the schedule of Wong et al. 2020)."""
    if config.schedule is Schedule.CONSTANT:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.4,
        anneal_strategy="linear", cycle_momentum=False, div_factor=1e4, final_div_factor=1.0)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    seconds: float = 0.0  # wall time spent training, summed over resumed sessions


def train(model: nn.Module, data: ImageSet, mix: StrengthMix = StrengthMix(),
          source: AdversarialSource | None = None,
          config: TrainConfig | None = None, *,
          val: ImageSet | None = None, state_path: str | Path | None = None,
          pin: Mapping[str, Any] | None = None, progress: bool = True,
          desc: str = "train", distributed: bool = True) -> TrainResult:
    """Train ``model`` in place on ``data`` mixed by ``mix`` (SPEC A3); returns its history.

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
    source = source or WhiteBox()
    config = config or TrainConfig()
    world = distributed_.world_size() if distributed else 1
    rank = distributed_.rank() if world > 1 else 0
    device = torch.device(distributed_.device_for_rank(config.device) if world > 1
                          else config.device)
    model.to(device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model.to(memory_format=layout)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    averaged = _averaged(model, config.average)
    n = len(data)
    per_rank = config.batch_size if world == 1 else max(1, config.batch_size // world)
    share = -(-n // world)  # examples per rank and epoch (the shuffle padded to N equal shares)
    steps = -(-share // per_rank)
    sched = _scheduler(opt, config, steps)
    result, start_epoch = TrainResult(), 0
    torch.manual_seed(config.seed)
    identity = _identity(config, mix, source, pin)
    if state_path is not None and Path(state_path).exists():
        state = load_state(state_path)
        _check_identity(state_path, state.get("identity"), identity)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
            if sched is not None and state.get("steps_per_epoch", steps) == steps:
                sched.load_state_dict(state["scheduler"])
            elif sched is not None:  # another world size: the schedule at the same epoch
                for _ in range(start * steps):
                    sched.step()
            if "rng" in state and world == 1:
                torch.set_rng_state(state["rng"])
            if averaged is not None:
                averaged.load_state_dict(state["averaged"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"training state {state_path} does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
        start_epoch = start
        result = TrainResult(list(state["history"]), float(state["seconds"]))
        log.info("%s: resuming after epoch %d", desc, start_epoch)
    groups = mix.groups(n, config.seed)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
        if world > 1:
            order = order.repeat(-(-share * world // n))[:share * world][rank::world]
            torch.manual_seed(config.seed + 1_000_003 * (epoch + 1) + rank)
        loss_sum, seen = 0.0, 0
        bar = tqdm(order.split(per_rank), desc=f"{desc} {epoch + 1}/{config.epochs}",
                   disable=not progress or rank > 0, leave=False)
        for i, index in enumerate(bar):
            x, y = data.x[index].to(device, memory_format=layout), data.y[index].to(device)
            augment = FlipCrop.draw(x, flip=data.info.flips) if config.augment else None
            if augment is not None:
                x = augment(x).contiguous(memory_format=layout)
            scale = config.strength_scale(epoch * steps + i, config.epochs * steps)
            xb, yb = mix.batch(model, x, y, index, source, groups,  # against the synced model
                               scale=scale, augment=augment)
            loss = F.cross_entropy(net(xb), yb, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if averaged is not None:
                averaged.update_parameters(model)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
        if world > 1:
            totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            loss_sum, seen = float(totals[0]), int(totals[1])
        row: dict[str, float] = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
        if val is not None and len(val):
            row["val_accuracy"] = accuracy(model if averaged is None else averaged.module,
                                           val.x, val.y, device=device)
        result.seconds += time.perf_counter() - t0
        row["seconds"] = result.seconds
        result.history.append(row)
        if rank == 0:
            log.info("%s epoch %d/%d: loss %.4f, validation accuracy %s (%.1f s)", desc,
                     epoch + 1, config.epochs, row["loss"],
                     f"{row['val_accuracy']:.4f}" if val else "-", result.seconds)
        if state_path is not None and rank == 0:
            save_state(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "epoch": epoch + 1, "history": result.history,
                                    "seconds": result.seconds, "identity": identity,
                                    "scheduler": None if sched is None else sched.state_dict(),
                                    "steps_per_epoch": steps, "rng": torch.get_rng_state(),
                                    **({} if averaged is None
                                       else {"averaged": averaged.state_dict()})})
        if world > 1:
            torch.distributed.barrier()  # the state is written before any rank goes on
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return result


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
    fields = {k: v for k, v in asdict(config).items()
              if k != "device" and not (k in OPTIONAL and not v)}
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
