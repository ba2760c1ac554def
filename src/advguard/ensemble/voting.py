"""Parallel MAT's upper-boundary decision unit (SPEC A3): ``Σ_k a_k · softmax(member_k(x))``.

Rules:

* ``mean`` — ``a_k = 1/S``;
* ``learned`` — ``a = softmax(w)``, one global weight per member, fitted;
* ``gated`` — ``a(x) = softmax(g(p(x)))``, where ``g`` is a small network on the members'
  probability vectors ``p(x)`` (S·C inputs), so the weights depend on the input.

``learned`` and ``gated`` are fitted by :func:`fit_voting` on a validation split that holds clean
AND adversarial examples (the unit cannot learn whom to trust from clean data alone), with the
members frozen. :class:`VotingEnsemble` returns the log of the voted probabilities, so the
cross-entropy on its output is the loss of the voted prediction and white-box attacks go through
the whole ensemble, voting unit included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advguard.batching import map_batches
from advguard.data import DataOptions
from advguard.errors import CheckpointError, InputError, parse_choice
from advguard.io import load_tensors, read_metadata, save_tensors
from advguard.models import (
    ModelCard,
    ModelOptions,
    build,
    card_for,
    load_model,
    model_card,
)

log = logging.getLogger(__name__)

MAX_MEMBERS = 64  # an ensemble file claiming more is refused before anything is built


class VotingRule(str, Enum):
    MEAN = "mean"
    LEARNED = "learned"
    GATED = "gated"


def parse_rule(rule: str | VotingRule) -> VotingRule:
    return parse_choice(VotingRule, rule, "voting rule")


class VotingEnsemble(nn.Module):
    """Members combined by a voting rule (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module], rule: str | VotingRule = "mean",
                 num_classes: int | None = None, gate_hidden: int = 64) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.rule = parse_rule(rule).value
        s = len(members)
        self.logits = nn.Parameter(torch.zeros(s), requires_grad=self.rule == "learned")
        self.gate: nn.Module | None = None
        if self.rule == "gated":
            if num_classes is None:
                raise ValueError("the gated rule needs num_classes")
            out = nn.Linear(gate_hidden, s)
            nn.init.zeros_(out.weight)  # start as the mean vote
            nn.init.zeros_(out.bias)
            self.gate = nn.Sequential(nn.Linear(s * num_classes, gate_hidden), nn.ReLU(), out)

    def member_log_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's class log-probabilities, (N, S, classes)."""
        return torch.stack([m(x).log_softmax(dim=1) for m in self.members], dim=1)

    def vote_log_weights(self, log_probs: torch.Tensor) -> torch.Tensor:
        """``log a`` (N, S) for members' log-probabilities (N, S, C)."""
        n, s, _ = log_probs.shape
        if self.gate is not None:
            return self.gate(log_probs.exp().flatten(1)).log_softmax(dim=1)
        return self.logits.log_softmax(dim=0).expand(n, s)

    def vote(self, log_probs: torch.Tensor) -> torch.Tensor:
        """``log Σ_k a_k p_k`` from members' log-probabilities (N, S, C), computed in log space
        (logsumexp) so that confident predictions keep their gradient: the probability-space
        form rounds 1 − p to 0 in float32 and hands white-box attacks a zero gradient."""
        return torch.logsumexp(self.vote_log_weights(log_probs).unsqueeze(2) + log_probs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vote(self.member_log_probabilities(x))


def fit_voting(ensemble: VotingEnsemble, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30,
               lr: float = 1e-2, batch_size: int = 512, seed: int = 0,
               device: str | torch.device = "cpu") -> list[float]:
    """Fit the voting unit's parameters (members frozen) by cross-entropy of the vote on
    ``(x, y)`` — the validation split's clean and adversarial examples. Returns the loss per
    epoch; the ``mean`` rule has nothing to fit."""
    if ensemble.rule == VotingRule.MEAN.value:
        return []
    ensemble.to(device).eval()
    with torch.no_grad():
        log_probs = map_batches(ensemble.member_log_probabilities, x, batch_size=1000,
                                device=device).to(device)
    params = [ensemble.logits] if ensemble.gate is None else list(ensemble.gate.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    y = y.to(device)
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for index in torch.randperm(len(y), generator=gen).split(batch_size):
                loss = F.nll_loss(ensemble.vote(log_probs[index]), y[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(index)
            losses.append(total / len(y))
    return losses


def save_ensemble(path: str | Path, ensemble: VotingEnsemble, *, arch: str, dataset: str,
                  card: ModelCard | None = None, **meta: Any) -> Path:
    """Write all members (built from ``card``, or zoo ``arch`` on ``dataset``) and the voting
    unit to one safetensors file."""
    card = card or card_for(arch, dataset)
    return save_tensors(path, ensemble.state_dict(),
                        {"arch": arch, "dataset": dataset, "model": card.to_json(),
                         "members": len(ensemble.members), "rule": ensemble.rule, **meta})


def load_ensemble(path: str | Path, *, trust_builder: bool = False
                  ) -> tuple[VotingEnsemble, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if "members" not in meta:
        raise CheckpointError(f"{path} is not an advguard ensemble checkpoint")
    count = meta["members"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_MEMBERS:
        raise CheckpointError(f"{path}: 'members' must be an integer in [1, {MAX_MEMBERS}], "
                              f"got {count!r}")
    card = model_card(meta, path, trust_builder=trust_builder)
    members = [build(card) for _ in range(count)]
    ensemble = VotingEnsemble(members, rule=meta.get("rule", VotingRule.MEAN.value),
                              num_classes=card.num_classes)
    if "weights" in tensors and "logits" not in tensors:  # files of advguard 0.1's first format
        tensors["logits"] = tensors.pop("weights").log()
    try:
        ensemble.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its ensemble description: "
                              f"{str(exc).splitlines()[0]}") from None
    return ensemble.eval(), meta


def load_any(path: str | Path, *, trust_builder: bool = False
             ) -> tuple[nn.Module, dict[str, Any]]:
    """A model or an ensemble checkpoint, whichever ``path`` holds: ``(module, metadata)``;
    ``trust_builder``: see :func:`advguard.models.model_card`."""
    load = load_ensemble if "members" in read_metadata(path) else load_model
    return load(path, trust_builder=trust_builder)


def open_model(checkpoint: str | Path | None, model: ModelOptions, data: DataOptions, *,
               need_data: bool = True) -> tuple[nn.Module, dict[str, Any], DataOptions]:
    """The model a command works on, ``(module in eval mode, metadata, data options)``: an
    advguard checkpoint (model or ensemble; the data options left out are the checkpoint's,
    and data given must fit the model's input and classes), or a builder with a user's
    weights (``--model … --weights … --data …``)."""
    if checkpoint is not None:
        if model.model is not None or model.weights is not None:
            raise InputError("give a checkpoint, or --model and --weights, not both")
        net, meta = load_any(checkpoint, trust_builder=model.trust_builder)
        if not need_data:
            return net, meta, data
        given = data.data is not None
        data = data.with_checkpoint(meta)
        if given:
            _check_fits(model_card(meta, checkpoint), data.info(), checkpoint)
        return net, meta, data
    if model.model is None:
        raise InputError("give a checkpoint, or --model (with --weights) and --data")
    if data.data is None:
        raise InputError("--model needs --data: the images the model classifies")
    info = data.info()
    if model.weights is None:
        log.warning("no --weights: %s is untrained", model.model)
    net, card = model.build(info)
    return net.eval(), {"model": card.to_json(), "arch": card.builder, "dataset": info.name,
                        "data": data.to_json()}, data


def _check_fits(card: ModelCard, info: Any, where: str | Path) -> None:
    """Data ``info`` must have the input shape and the number of classes of model ``card``."""
    want = (card.channels, *card.size)
    if tuple(info.shape) != want or info.num_classes != card.num_classes:
        raise InputError(
            f"{where} takes {card.channels}x{card.size[0]}x{card.size[1]} images of "
            f"{card.num_classes} classes; {info.name} has "
            f"{'x'.join(map(str, info.shape))} images of {info.num_classes} classes")
