"""Threat models as objects (in the manner of foolbox's distances): a norm owns the distance,
the projection onto its ε-ball (and [0, 1]), the steepest-ascent direction of a gradient and the
random start inside the ball. Attacks take one (:data:`LINF`, the papers' and the default; or
:data:`L2`) instead of hard-coding L∞.

Strengths are in pixel units of images in [0, 1]: an L∞ ε is at most 1, an L2 ε at most the
diameter of the image cube, √(C·H·W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advguard.errors import InputError
from advguard.options import check_strengths, is_number

Radius = float | torch.Tensor  # one radius, or one per example shaped (N, 1, 1, 1)


def _per_example(eps: Radius, x: torch.Tensor) -> Radius:
    if isinstance(eps, torch.Tensor):
        return eps.to(x.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return float(eps)


@dataclass(frozen=True)
class Norm:
    """A threat model: ``name`` as the command line spells it (``linf``, ``l2``)."""

    name: str

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) distance between each pair of images."""
        raise NotImplementedError

    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: Radius) -> torch.Tensor:
        """``adv`` moved into the ε-ball around ``x`` and into [0, 1]."""
        raise NotImplementedError

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit step of steepest ascent of a gradient, in this norm."""
        raise NotImplementedError

    def random_start(self, x: torch.Tensor, eps: Radius,
                     gen: torch.Generator | None) -> torch.Tensor:
        """A random point of the ε-ball around ``x`` (in [0, 1])."""
        raise NotImplementedError

    def check(self, eps: object, shape: tuple[int, ...] | None = None) -> float:
        """``eps`` if it is a strength of this norm, else one clear error."""
        top = 1.0 if self.name == "linf" else (math.sqrt(math.prod(shape)) if shape else
                                               float("inf"))
        if isinstance(eps, torch.Tensor) and eps.ndim == 0:
            eps = eps.item()
        if not (isinstance(eps, int | float) and not isinstance(eps, bool) and 0 <= eps <= top):
            raise InputError(f"an {self.name} strength must be a number in [0, {top:g}] (pixel "
                             f"units of images in [0, 1]), got {eps!r}")
        return float(eps)

    def check_all(self, eps: object, shape: tuple[int, ...] | None = None) -> list[float]:
        """``eps`` (one strength or several) as a list of strengths of this norm: L∞ through
        :func:`~advguard.options.check_strengths` (its messages), another norm one
        :meth:`check` each; nothing given is one clear error."""
        if self.name == "linf":
            return check_strengths(eps)  # type: ignore[arg-type]
        values = [eps] if is_number(eps) else list(eps)  # type: ignore[call-overload]
        if not values:
            raise InputError("no strength given: eps must be a float or a non-empty list")
        return [self.check(e, shape) for e in values]

    def torchattacks(self) -> str:
        """How torchattacks and the authors' AutoAttack name this norm."""
        return {"linf": "Linf", "l2": "L2"}[self.name]


class _LInf(Norm):
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).abs().amax(1)

    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: Radius) -> torch.Tensor:
        e = _per_example(eps, x)
        if isinstance(e, torch.Tensor):
            return torch.min(torch.max(adv, x - e), x + e).clamp_(0.0, 1.0)
        return torch.clamp(adv, x - e, x + e).clamp_(0.0, 1.0)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def random_start(self, x: torch.Tensor, eps: Radius,
                     gen: torch.Generator | None) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return (x + (2 * noise - 1) * _per_example(eps, x)).clamp_(0.0, 1.0)


class _L2(Norm):
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1)

    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: Radius) -> torch.Tensor:
        delta = adv - x
        norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        factor = torch.clamp(_per_example(eps, x) / norms.clamp_min(1e-12), max=1.0)
        # clipping to [0, 1] after scaling only shortens δ: the result stays in the ball
        return (x + delta * factor).clamp_(0.0, 1.0)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
        return grad / norms.clamp_min(1e-12)

    def random_start(self, x: torch.Tensor, eps: Radius,
                     gen: torch.Generator | None) -> torch.Tensor:
        """Uniform in the ball: a Gaussian direction, a radius ε·u^(1/d)."""
        d = x[0].numel()
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        u = torch.rand(len(x), generator=gen, device=x.device, dtype=x.dtype) ** (1.0 / d)
        r = u.view(-1, *[1] * (x.dim() - 1)) * _per_example(eps, x)
        return self.project(x, x + self.direction(g) * r, eps)


LINF: Norm = _LInf("linf")
L2: Norm = _L2("l2")
NORMS: dict[str, Norm] = {n.name: n for n in (LINF, L2)}


def norm_named(name: str | Norm) -> Norm:
    if isinstance(name, Norm):
        return name
    key = str(name).lower().replace("∞", "inf")
    if key not in NORMS:
        raise InputError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[key]
