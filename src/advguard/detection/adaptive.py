"""An attacker who knows the detector (beyond the paper): a PGD objective, not a loop of its own.

Targeted PGD toward a class t whose loss also moves the input's deep features where the detector
trusts class t: onto the centroid of class t's bank entries (:class:`CentroidPull`: Sitawarin &
Wagner 2019's "mean" attack), or into a neighbourhood of class-t entries and out of every other
class's (:class:`SoftNeighbours`: their soft neighbour count, the surrogate they made for
attacking Deep kNN)::

    PGD(loss=detector.adaptive_loss(), targeted=True, random_start=False)(model, x, t, eps)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.detection.features import LayersCapture, LayerSpec
from advguard.errors import InputError

Transforms = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


class LayerTerms:
    """``CE(model(x), t) + weight · Σ_ℓ term_ℓ(g_ℓ(f_ℓ(x)), t)`` (batch sums) over the layers a
    detector reads, ``g_ℓ`` its transform of layer ℓ's features: one forward pass with hooks,
    a subclass writes :meth:`term`. Implements :class:`~advguard.attacks.Loss`."""

    def __init__(self, layers: list[LayerSpec], transforms: Transforms, weight: float) -> None:
        self.layers, self.transforms, self.weight = layers, transforms, weight

    def term(self, key: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with LayersCapture(model, self.layers) as cap:
            logits = model(x)
        total = torch.zeros((), device=x.device)
        for key, f in cap.features.items():
            total = total + self.term(key, self.transforms[key](f), y)
        return F.cross_entropy(logits, y, reduction="sum") + self.weight * total, logits


class CentroidPull(LayerTerms):
    """``CE(model(x), t) + weight · Σ_ℓ ‖g_ℓ(f_ℓ(x)) − c_{ℓ,t}‖²`` (batch sums; each layer's
    term divided by its dimension with ``per_dim``): at every layer a multi-layer detector
    reads, its transform ``g_ℓ`` of the features pulled onto the target class's centroid
    ``c_{ℓ,t}`` in that space."""

    def __init__(self, layers: list[LayerSpec], centroids: dict[str, np.ndarray],
                 transforms: Transforms, weight: float = 1.0, per_dim: bool = True) -> None:
        super().__init__(layers, transforms, weight)
        self.per_dim = per_dim
        self.centroids = {k: torch.from_numpy(v) for k, v in centroids.items()}

    def term(self, key: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = (z - self.centroids[key].to(z.device)[y]).pow(2).sum()
        return d2 / z.shape[1] if self.per_dim else d2


def pick_surrogate(surrogates: tuple[str, ...], surrogate: str | None) -> str:
    """``surrogate`` checked against a detector's, or its default (the first)."""
    if surrogate is None:
        return surrogates[0]
    if surrogate not in surrogates:
        raise InputError(f"unknown surrogate {surrogate!r}; this detector's: "
                         f"{', '.join(surrogates)}")
    return surrogate


STEEPNESS = 2.0  # the sigmoid's steepness per neighbourhood radius
RADIUS_SAMPLE = 1000  # bank entries the neighbourhood radius is measured on


class SoftNeighbours(LayerTerms):
    """A differentiable stand-in for a k-nearest-neighbour vote (Sitawarin & Wagner 2019, "On
    the robustness of deep k-nearest neighbors"), summed over the layers a detector reads::

        CE(model(x), t) + weight · Σ_ℓ [ Σ_{j ∈ G_t} σ(α (d_j / η_ℓ − 1))
                                        + Σ_{j ∈ N_¬t} σ(α (1 − d_j / η_ℓ)) ]

    ``d_j`` the distance in the detector's space (``transforms[ℓ]`` of the features) to bank
    entry j; ``G_t`` the k entries of class t nearest the current iterate (the guides), ``N_¬t``
    its k nearest entries of other classes; ``η_ℓ`` the mean distance from a bank entry to its
    k-th neighbour (a typical neighbourhood's radius); α = 2 (distances counted in radii, so
    the steepness does not depend on the space's scale; the authors use 4 per unit distance on
    unit-normalised features). Each sum is a soft count —
    guides outside the radius, other classes' entries inside it — so descending it brings k
    class-t entries into the neighbourhood and pushes the rest out, which is what the vote
    counts. The guides and neighbours are chosen again at every step, without gradient (the
    authors fix them at the start; re-choosing follows the iterate). A guide many radii away
    saturates its sigmoid and gives no gradient (the surrogate's nature): the first steps are
    led by the cross-entropy and by the push away from the other classes. Batch sums."""

    def __init__(self, layers: list[LayerSpec], banks: dict[str, tuple[np.ndarray, np.ndarray]],
                 transforms: Transforms, k: int, weight: float = 1.0, *, seed: int = 0) -> None:
        super().__init__(layers, transforms, weight)
        self.k = int(k)
        self.banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, (v, y) in banks.items():  # sorted by class: class c is one slice of rows
            labels = torch.from_numpy(np.asarray(y, np.int64))
            order = torch.argsort(labels, stable=True)
            self.banks[key] = (torch.from_numpy(np.asarray(v, np.float32))[order], labels[order])
        self.radii = {key: neighbourhood_radius(v, self.k, seed)
                      for key, (v, _) in self.banks.items()}

    def term(self, key: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bank, labels = (t.to(z.device) for t in self.banks[key])
        d = _distances(z, bank)  # (B, N): memory grows with the bank, not with k × D
        guides, others = self._chosen(d.detach().clone(), labels, y)
        eta = self.radii[key]
        return (torch.sigmoid(STEEPNESS * (d.gather(1, guides) / eta - 1)).sum()
                + torch.sigmoid(STEEPNESS * (1 - d.gather(1, others) / eta)).sum())

    @torch.no_grad()
    def _chosen(self, d: torch.Tensor, labels: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank rows ``(guides, others)``, each (B, k), from the distances ``d`` (B, N; written
        over): the k nearest of the target class, and the k nearest of every other class."""
        classes = torch.arange(max(int(labels[-1]), int(y.max())) + 2, device=y.device)
        starts = torch.searchsorted(labels, classes)
        sizes = starts[y + 1] - starts[y]
        if int(sizes.min()) == 0:
            raise InputError("a target class has no bank entry to pull toward")
        k = max(1, min(self.k, int(sizes.min()), int((len(labels) - sizes).min())))
        guides = torch.empty(len(d), k, dtype=torch.long, device=d.device)
        for c in torch.unique(y).tolist():
            rows = torch.nonzero(y == c).squeeze(1)
            lo, hi = int(starts[c]), int(starts[c + 1])
            guides[rows] = d[rows, lo:hi].topk(k, largest=False).indices + lo
            d[rows, lo:hi] = float("inf")  # the target class is not among the others
        return guides, d.topk(k, largest=False).indices


def _distances(z: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, N) of the rows of ``z`` to the bank's, differentiable in ``z``;
    the small floor keeps the gradient finite at distance 0."""
    d2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ bank.T + bank.pow(2).sum(1)
    return d2.clamp_min(1e-12).sqrt()


@torch.no_grad()
def neighbourhood_radius(bank: torch.Tensor, k: int, seed: int = 0) -> float:
    """Mean distance from a bank entry to its k-th nearest other entry, over a seeded sample of
    at most :data:`RADIUS_SAMPLE` entries."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(bank), generator=gen)[:RADIUS_SAMPLE]
    kth = min(k, len(bank) - 1)
    if kth < 1:
        raise InputError("a neighbourhood radius needs a bank of at least two entries")
    radii = [torch.cdist(bank[part], bank).kthvalue(kth + 1, dim=1).values  # +1: itself
             for part in rows.split(200)]
    return max(float(torch.cat(radii).mean()), 1e-12)
