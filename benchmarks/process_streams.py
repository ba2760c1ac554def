"""Query streams for choosing the query watch on validation traffic: what query-based attackers
send (with and without query blinding) and what honest look-alike clients send, all on MNIST
*training* images (the last 3,000 of the training file), never on the test images the guard
benchmarks report. The attacks run in-process against the guard's own model, every query
recorded as the service would receive it.

Attack streams: Square (torchattacks, reference settings: margin loss, p_init 0.8,
``resc_schedule=False``) and SimBA (pixel basis, steps of 0.2), ε = 0.3, plain and with query
blinding — uniform noise of 0.1 on the whole image, or of ε on a random half of it, redrawn
every query, kept inside the ε-ball. Honest streams: a fixed camera (one scene, fresh sensor
noise σ 0.02 per frame), a jittering camera (the same, shifted by up to 2 px), augmented copies
(5 of each of 20 images: shift, brightness, noise), distinct images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_honest import noisy, shift
from torch import nn

EPS = 0.3
SIMBA_STEP = 0.2


class Recorder(nn.Module):
    """The model as a black box that records every query (blinded as the attacker sends it)."""

    def __init__(self, model: nn.Module, x0: torch.Tensor, blind: float, part: float,
                 seed: int) -> None:
        super().__init__()
        self.model, self.x0, self.blind, self.part = model, x0, blind, part
        self.gen = torch.Generator().manual_seed(seed)
        self.queries: list[torch.Tensor] = []

    def blinded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blind:
            return x
        noise = (torch.rand(x.shape, generator=self.gen) * 2 - 1) * self.blind
        if self.part < 1:
            h, w = x.shape[-2:]
            side = max(1, round(h * self.part ** 0.5)), max(1, round(w * self.part ** 0.5))
            mask = torch.zeros(x.shape)
            for i in range(len(x)):
                top = int(torch.randint(h - side[0] + 1, (1,), generator=self.gen))
                left = int(torch.randint(w - side[1] + 1, (1,), generator=self.gen))
                mask[i, :, top:top + side[0], left:left + side[1]] = 1
            noise = noise * mask
        return torch.min(torch.max(x + noise, self.x0 - EPS), self.x0 + EPS).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.blinded(x.detach())
        self.queries.extend(q)
        with torch.no_grad():
            return self.model(q)


def square_stream(model: nn.Module, x0: torch.Tensor, y: int, n: int, blind: float = 0.0,
                  part: float = 1.0, seed: int = 0) -> torch.Tensor:
    import torchattacks

    rec = Recorder(model, x0, blind, part, seed)
    attack = torchattacks.Square(rec, norm="Linf", eps=EPS, n_queries=n, n_restarts=1,
                                 p_init=0.8, loss="margin", resc_schedule=False, seed=seed)
    attack(x0[None], torch.tensor([y]))
    return torch.stack(rec.queries[:n])


def simba_stream(model: nn.Module, x0: torch.Tensor, y: int, n: int, blind: float = 0.0,
                 part: float = 1.0, seed: int = 0) -> torch.Tensor:
    """SimBA in the pixel basis, as bench_blackbox.py runs it (it goes on past a success, so
    every stream is ``n`` queries long)."""
    rec = Recorder(model, x0, blind, part, seed)
    gen = torch.Generator().manual_seed(seed)
    x = x0.clone()
    p = rec(x[None]).softmax(1)[0, y]
    for i in torch.randperm(x.numel(), generator=gen).tolist():
        for sign in (1.0, -1.0):
            cand = x.clone()
            flat = cand.view(-1)
            lo, hi = float(x0.view(-1)[i]) - EPS, float(x0.view(-1)[i]) + EPS
            flat[i] = (flat[i] + sign * SIMBA_STEP).clamp(lo, hi).clamp(0, 1)
            probs = rec(cand[None]).softmax(1)
            if probs[0, y] < p:
                x, p = cand, probs[0, y]
                break
        if len(rec.queries) >= n:
            break
    return torch.stack(rec.queries[:n])


def honest_stream(x: torch.Tensor, kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` queries of an honest client of ``kind`` on the images ``x`` (n distinct ones for
    "distinct")."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "fixed-camera":
        return torch.cat([noisy(x[:1], gen) for _ in range(n)])
    if kind == "jittering-camera":
        return torch.cat([noisy(shift(x[:1], gen), gen) for _ in range(n)])
    if kind == "augmented":
        out = []
        for i in range(n):
            b = float(torch.empty(1).uniform_(-0.1, 0.1, generator=gen))
            out.append(noisy(shift(x[i // 5:i // 5 + 1], gen) + b, gen))
        return torch.cat(out)
    if kind == "distinct":
        return x[:n].clone()
    raise ValueError(kind)


ATTACKS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, float]]] = {
    "square": (square_stream, {}),
    "square/blinded-0.1": (square_stream, {"blind": 0.1}),
    "square/blinded-half-eps": (square_stream, {"blind": EPS, "part": 0.5}),
    "simba": (simba_stream, {}),
    "simba/blinded-0.1": (simba_stream, {"blind": 0.1}),
    "simba/blinded-half-eps": (simba_stream, {"blind": EPS, "part": 0.5}),
}
HONEST = ("fixed-camera", "jittering-camera", "augmented", "distinct")
