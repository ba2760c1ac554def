"""Parallel MAT (SPEC A3, eq. 3): S copies, copy k trained on clean ∪ f_εk(clean).

Members are independent, so they may train concurrently: ``workers > 1`` trains them in separate
processes (spawned; each gets ``threads // workers`` CPU threads), the paper's trade of memory
for wall time; under torchrun each rank trains every N-th member.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard import distributed
from advguard.data import ImageSet
from advguard.ensemble.voting import VotingEnsemble
from advguard.training import AdversarialSource, StrengthMix, TrainConfig, TrainResult, train


@dataclass
class ParallelResult:
    members: list[TrainResult]
    peak_rss_mb: list[float]  # peak resident memory of each process that trained members


def _train_member(k: int, build: Callable[[], nn.Module], data: ImageSet, eps: float,
                  source: AdversarialSource | None, config: TrainConfig,
                  val: ImageSet | None, state_path: Path | None, clean: bool, progress: bool,
                  threads: int | None) -> tuple[dict[str, Any], TrainResult, float]:
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed + k)
    member = build()
    result = train(member, data, StrengthMix((float(eps),), clean=clean), source, config,
                   val=val, state_path=state_path, progress=progress,
                   desc=f"parallel[{k}] eps={eps:g}", distributed=False)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {k: v.cpu() for k, v in member.state_dict().items()}, result, rss_mb


def train_parallel(build: Callable[[], nn.Module], data: ImageSet, strengths: Sequence[float],
                   source: AdversarialSource | None = None,
                   config: TrainConfig | None = None, *, val: ImageSet | None = None,
                   state_dir: str | Path | None = None, progress: bool = True,
                   workers: int = 1, clean: bool = True) -> tuple[VotingEnsemble, ParallelResult]:
    """Train one member per strength with the shared loop; returns the mean-vote ensemble.

    ``build`` makes a fresh member (seeded by ``config.seed + k``; with ``workers > 1`` it must
    be picklable, e.g. ``functools.partial(build_model, arch, dataset)``); ``source`` is the
    members' source of adversarial copies (``None``: white-box FGSM on each member itself);
    ``clean=False`` trains each member on its adversarial copies only.
    """
    config = config or TrainConfig()
    paths = [None if state_dir is None else Path(state_dir) / f"parallel-{k}.state.pt"
             for k in range(len(strengths))]
    jobs = [(k, build, data, eps, source, config, val, paths[k], clean) for k, eps in
            enumerate(strengths)]
    if distributed.active():  # under torchrun: every N-th member on each rank
        def member(job: tuple[Any, ...]) -> tuple[dict[str, Any], TrainResult, float]:
            return _train_member(*job, progress, None)  # type: ignore[call-arg]

        outputs = distributed.spread(jobs, member)
    elif workers <= 1:
        outputs = [_train_member(*job, progress, None) for job in jobs]
    else:
        threads = max(1, torch.get_num_threads() // workers)
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_train_member, *job, False, threads) for job in jobs]
            outputs = [f.result() for f in futures]
    members = []
    for state, _, _ in outputs:
        member = build()
        member.load_state_dict(state)
        members.append(member.eval())
    return (VotingEnsemble(members).eval(),
            ParallelResult([o[1] for o in outputs], [o[2] for o in outputs]))
