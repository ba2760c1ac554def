"""Label-preserving augmentation of a training batch, one draw per example: a random crop of
the image padded by an eighth of its side (reflected), and a horizontal flip where the dataset
allows it (natural images, not digits). Draws come from torch's global generator, which the
training loop seeds and checkpoints.

:func:`near_copy` draws what a guard's honest clients send again of one scene: the image moved
by a pixel or two (its edge black or mirrored) with fresh sensor noise — the partner of each
image in stability training (Zheng et al. 2016, "Improving the robustness of deep neural
networks via stability training").

A drawn :class:`FlipCrop` can be applied to more than the images: the transfer setting's fixed
FGSM directions of a batch get the same crop and flip as their images, so the adversarial copy
of an augmented image is the augmented adversarial copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FlipCrop:
    """One batch's draw: per-example shifts ``dy``, ``dx`` in [0, 2·pad] and ``mirror``; the
    edge the shift uncovers is reflected, or black where ``black`` is set (per example, or
    ``None``: none)."""

    pad: int
    dy: torch.Tensor  # (N,)
    dx: torch.Tensor  # (N,)
    mirror: torch.Tensor  # (N,) bool
    black: torch.Tensor | None = None  # (N,) bool

    @classmethod
    def draw(cls, x: torch.Tensor, *, flip: bool, pad: int | None = None) -> FlipCrop:
        n, h = len(x), x.shape[2]
        pad = h // 8 if pad is None else pad
        dy = torch.randint(0, 2 * pad + 1, (n,))
        dx = torch.randint(0, 2 * pad + 1, (n,))
        mirror = torch.rand(n) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return cls(pad, dy, dx, mirror)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (N, C, H, W), each example shifted and mirrored as drawn."""
        n, _, h, w = t.shape
        dev = t.device
        if self.pad:
            p = self.pad
            padded = F.pad(t, (p, p, p, p), mode="reflect")
            if self.black is not None:
                zeros = F.pad(t, (p, p, p, p))
                padded = torch.where(self.black.to(dev).view(n, 1, 1, 1), zeros, padded)
            padded = padded.permute(0, 2, 3, 1)
            rows = torch.arange(h, device=dev).view(1, h, 1) + self.dy.to(dev).view(n, 1, 1)
            cols = torch.arange(w, device=dev).view(1, 1, w) + self.dx.to(dev).view(n, 1, 1)
            batch = torch.arange(n, device=dev).view(n, 1, 1)
            t = padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
        return torch.where(self.mirror.to(dev).view(n, 1, 1, 1), t.flip(3), t)


def near_copy(x: torch.Tensor, *, most: int, sigma: float) -> torch.Tensor:
    """``x`` (N, C, H, W) in [0, 1] as a camera sends its scene again: each image moved by up
    to ``most`` pixels each way (the edge black for half of them, mirrored for the others),
    plus Gaussian noise of standard deviation ``sigma``, clipped to [0, 1]."""
    if most:
        move = FlipCrop.draw(x, flip=False, pad=most)
        x = replace(move, black=torch.rand(len(x)) < 0.5)(x)
    return (x + sigma * torch.randn_like(x)).clamp(0, 1) if sigma else x
