"""How a model is trained (:class:`TrainConfig`, its options declared once, on its fields), and
the optimizer, learning-rate schedule and mixed precision it asks for."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from advguard import options
from advguard.errors import InputError, parse_choice

RECIPE = "the recipe's"  # where a training command takes the fields a recipe sets

# TrainConfig fields added later: a state names them only when they differ from the default
OPTIONAL = ("ramp", "average", "augment", "label_smoothing", "channels_last", "optimizer",
            "momentum", "nesterov", "amp", "clip_grad", "trades_beta", "mart_beta",
            "stability", "stability_move", "stability_noise")


class Optimizer(str, Enum):
    ADAM = "adam"
    SGD = "sgd"  # with momentum (Nesterov by default), as ResNets are trained


class Precision(str, Enum):
    OFF = "off"  # float32 throughout
    BF16 = "bf16"  # autocast to bfloat16 (CPUs and recent GPUs)
    FP16 = "fp16"  # autocast to float16 with a gradient scaler (GPUs)


class Schedule(str, Enum):
    CONSTANT = "constant"
    ONE_CYCLE = "one-cycle"  # 0 -> lr -> 0, linear (Wong et al. 2020)


@dataclass
class TrainConfig:
    epochs: int = options.option(10, "passes over the clean training set")
    batch_size: int = options.option(
        128, "clean examples per step (the mixed batch holds (S+1)x as many)", fallback=RECIPE)
    lr: float = options.option(1e-3, "learning rate (the peak of a one-cycle schedule)",
                               fallback=RECIPE)
    weight_decay: float = options.option(0.0, "L2 weight decay of the optimizer")
    seed: int = options.option(
        0, "shuffling, reduced-size groups, sampled strengths and random starts")
    device: str = options.option("auto", "cpu, cuda, cuda:N, mps, or auto (CUDA when present)")
    schedule: Schedule = options.option(
        Schedule.CONSTANT, "learning rate over the run: constant or one-cycle", fallback=RECIPE)
    ramp: float = options.option(
        0.0, "strengths rise linearly from 0 over this fraction of training", fallback=RECIPE)
    average: float = options.option(
        0.0, "EMA decay of the weights per step, e.g. 0.999; 0: off (the model ends averaged)",
        fallback=RECIPE)
    augment: bool = options.option(
        False, "random crop, and flip where the data allows, of every training batch")
    label_smoothing: float = options.option(0.0, "label smoothing of the cross-entropy loss")
    channels_last: bool = options.option(False, "NHWC layout while training (faster "
                                                "convolutions on CPUs)")
    optimizer: Optimizer = options.option(Optimizer.ADAM, "adam, or sgd with momentum")
    momentum: float = options.option(0.9, "SGD momentum")
    nesterov: bool = options.option(True, "Nesterov momentum (SGD)")
    amp: Precision = options.option(
        Precision.OFF, "mixed precision: off, bf16 or fp16 (attacks still craft in float32)")
    clip_grad: float = options.option(0.0, "clip the gradient's norm to this; 0: off")
    trades_beta: float = options.option(
        0.0, "TRADES loss: cross-entropy on the clean images + β·KL(clean ‖ adversarial); 0: "
        "cross-entropy on the training batch", fallback=RECIPE)
    mart_beta: float = options.option(
        0.0, "MART loss: boosted cross-entropy on the adversarial images + β·KL(clean ‖ "
        "adversarial)·(1 − p_y(clean)); 0: off", fallback=RECIPE)
    stability: float = options.option(
        0.0, "stability training (Zheng et al. 2016): the loss + α·KL(f(x) ‖ f(x′)), x′ a "
        "near-copy of each clean image x (moved, with sensor noise), so that the model holds "
        "its class over a camera's frames of one scene; 0: off")
    stability_move: int = options.option(
        2, "stability training: pixels a near-copy is moved by at most, each way")
    stability_noise: float = options.option(
        0.02, "stability training: the near-copy's Gaussian noise (standard deviation)")

    def __post_init__(self) -> None:
        options.check_at_least(self, 1, "epochs", "batch_size")
        options.check_positive("lr", self.lr)
        self.device = options.device(self.device)
        if not self.weight_decay >= 0:
            raise InputError(f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        for name in ("trades_beta", "mart_beta", "stability", "stability_noise"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise InputError(f"{name} must be a number ≥ 0, got {getattr(self, name)!r}")
        if self.trades_beta and self.mart_beta:
            raise InputError("choose one loss: trades_beta or mart_beta, not both")
        if self.mart_beta and self.label_smoothing:
            raise InputError("the MART loss has no label smoothing: set label_smoothing to 0")
        options.check_at_least(self, 0, "stability_move")
        if not self.clip_grad >= 0:
            raise InputError(f"clip_grad must be ≥ 0, got {self.clip_grad!r}")
        for name in ("ramp", "average", "label_smoothing", "momentum"):
            options.check_below_one(name, getattr(self, name))
        self.schedule = parse_choice(Schedule, self.schedule, "schedule")
        self.optimizer = parse_choice(Optimizer, self.optimizer, "optimizer")
        self.amp = parse_choice(Precision, self.amp, "amp")

    @property
    def paired(self) -> bool:
        """The loss pairs each clean image with its adversarial copy (TRADES, MART)."""
        return bool(self.trades_beta or self.mart_beta)

    def strength_scale(self, step: int, steps: int) -> float:
        """The fraction of every strength used at global ``step`` of ``steps`` (the ε ramp)."""
        return 1.0 if self.ramp == 0 else min(1.0, (step + 1) / (self.ramp * steps))


def scheduler(opt: torch.optim.Optimizer, config: TrainConfig,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step learning-rate schedule: "one-cycle" rises linearly from ~0 to ``lr`` over the
    first 40% of the steps and falls back to ~0 (the schedule of Wong et al. 2020)."""
    if config.schedule is Schedule.CONSTANT:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.4,
        anneal_strategy="linear", cycle_momentum=False, div_factor=1e4, final_div_factor=1.0)


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer is Optimizer.SGD:
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def precision(config: TrainConfig, device: torch.device) -> tuple[Any, Any]:
    """``(autocast context factory, gradient scaler)`` of ``config.amp`` on ``device``: the
    forward pass and loss of training run in bf16/fp16, the scaler (fp16 only) keeps small
    gradients from underflowing. Off: a null context and a scaler that does nothing."""
    enabled = config.amp is not Precision.OFF
    dtype = torch.bfloat16 if config.amp is Precision.BF16 else torch.float16
    if enabled and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise InputError(f"mixed precision is not available on {device.type}")
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
                if enabled else contextlib.nullcontext)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp is Precision.FP16)
    return autocast, scaler
