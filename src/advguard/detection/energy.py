"""The energy score (Liu, Wang, Owens & Li 2020, "Energy-based out-of-distribution detection"):
``T · logsumexp(logits / T)``, the negative free energy of the model's logits. Higher means the
input looks like the training data, so it is the trust score as it stands (pytorch-ood's
``EnergyBased`` returns its negation, an outlier score). It reads no layer and keeps no bank:
fitting only sets the threshold on the calibration split.

Its adaptive attack (Tramèr et al. 2020) descends ``CE(model(x), t) − weight · E(x)``: the
target class *and* a high score, through the same logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.attacks import Loss
from advguard.detection.adaptive import pick_surrogate
from advguard.detection.base import Chunk, Detector, Features
from advguard.detection.features import LayerSpec
from advguard.errors import InputError
from advguard.options import option


@dataclass(frozen=True)
class EnergyOptions:
    temperature: float = option(1.0, "the energy score's temperature T (Liu et al.: 1)")

    def __post_init__(self) -> None:
        if not float(self.temperature) > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature!r}")


def energy_score(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T · logsumexp(logits / T)`` of each row (differentiable)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


class EnergyDetector(Detector):
    name = "energy"
    Options = EnergyOptions
    surrogates = ("energy",)
    options: EnergyOptions

    def resolve_layers(self, model: nn.Module) -> list[LayerSpec]:
        return []  # the logits alone

    def fit_feature_chunks(self, chunks: Iterable[Chunk]) -> EnergyDetector:
        self.fitted_keys_: list[str] = []  # no bank: the chunks are never read
        return self

    def score_features(self, features: Features, logits: np.ndarray) -> np.ndarray:
        self._check_fitted()
        z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
        return energy_score(z, self.options.temperature).numpy()

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def adaptive_loss(self, weight: float = 1.0, surrogate: str | None = None) -> Loss:
        pick_surrogate(self.surrogates, surrogate)
        return EnergyPull(self.options.temperature, weight)


class EnergyPull:
    """``CE(model(x), t) − weight · T·logsumexp(logits / T)`` (batch sums), descended by
    targeted PGD. Implements :class:`~advguard.attacks.Loss`."""

    def __init__(self, temperature: float, weight: float = 1.0) -> None:
        self.temperature, self.weight = temperature, weight

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        score = energy_score(logits.float(), self.temperature).sum()
        return F.cross_entropy(logits, y, reduction="sum") - self.weight * score, logits
