"""Parallel MAT (SPEC A3, eq. 3): S copies, copy k trained on clean ∪ f_εk(clean)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from advguard.data import ImageSet
from advguard.ensemble.voting import VotingEnsemble
from advguard.training import DirectionSource, StrengthMix, TrainConfig, TrainResult, train


def train_parallel(build: Callable[[], nn.Module], data: ImageSet, strengths: Sequence[float],
                   directions: Callable[[], DirectionSource] | None = None,
                   config: TrainConfig | None = None, *, val: ImageSet | None = None,
                   state_dir: str | Path | None = None, progress: bool = True,
                   rule: str = "mean") -> tuple[VotingEnsemble, list[TrainResult]]:
    """Train one member per strength with the shared loop, then combine them by ``rule``.

    ``build`` makes a fresh member (seeded by ``config.seed + k``); ``directions`` makes each
    member's direction source (``None``: white-box on the member itself).
    """
    config = config or TrainConfig()
    members, results = [], []
    for k, eps in enumerate(strengths):
        torch.manual_seed(config.seed + k)
        member = build()
        state = None if state_dir is None else Path(state_dir) / f"parallel-{k}.state.pt"
        results.append(train(member, data, StrengthMix((float(eps),)),
                             None if directions is None else directions(), config, val=val,
                             state_path=state, progress=progress,
                             desc=f"parallel[{k}] eps={eps:g}"))
        members.append(member)
    return VotingEnsemble(members, rule=rule).eval(), results
