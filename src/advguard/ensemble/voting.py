"""Parallel MAT's upper-boundary decision unit (SPEC A3): ``Σ_k a_k · softmax(member_k(x))``.

:class:`VotingEnsemble` is an ``nn.Module`` returning the log of the voted probabilities, so
cross-entropy on its output is the loss of the voted prediction and white-box attacks go through
the whole ensemble, voting unit included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.errors import CheckpointError
from advguard.io import load_tensors, save_tensors
from advguard.models import build_model


class VotingEnsemble(nn.Module):
    """Members combined by weights ``a`` (``a_k = 1/S`` for the ``mean`` rule)."""

    def __init__(self, members: Sequence[nn.Module], rule: str = "mean") -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if rule != "mean":
            raise ValueError(f"unknown voting rule {rule!r}; available: mean")
        self.members = nn.ModuleList(members)
        self.rule = rule
        self.register_buffer("weights", torch.full((len(members),), 1.0 / len(members)))

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's class probabilities, (S, N, classes)."""
        return torch.stack([m(x).softmax(dim=1) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.einsum("s,snc->nc", self.weights, self.member_probabilities(x))
        return probs.clamp_min(1e-12).log()


def save_ensemble(path: str | Path, ensemble: VotingEnsemble, *, arch: str, dataset: str,
                  **meta: Any) -> Path:
    """Write all members and the voting weights to one safetensors file."""
    return save_tensors(path, ensemble.state_dict(),
                        {"arch": arch, "dataset": dataset, "members": len(ensemble.members),
                         "rule": ensemble.rule, **meta})


def load_ensemble(path: str | Path) -> tuple[VotingEnsemble, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if "members" not in meta:
        raise CheckpointError(f"{path} is not an advguard ensemble checkpoint")
    members = [build_model(meta["arch"], meta["dataset"]) for _ in range(int(meta["members"]))]
    ensemble = VotingEnsemble(members, rule=meta["rule"])
    try:
        ensemble.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its ensemble description: "
                              f"{str(exc).splitlines()[0]}") from None
    return ensemble.eval(), meta
