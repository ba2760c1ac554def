"""Mean SSIM between clean and FGSM images, and the strength bound it gives (SPEC A4).

SSIM is Wang et al. (2004) with an 11-tap Gaussian window of σ = 1.5, K = (0.01, 0.03) and data
range 1, computed per channel over the valid region and averaged over channels, image and
dataset — ``pytorch_msssim.ssim`` with those settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_msssim import ssim

from advguard.attacks import check_strengths, perturb
from advguard.batching import batch_slices
from advguard.data.checks import check_images
from advguard.errors import InputError

WINDOW, SIGMA = 11, 1.5


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of images (N, C, H, W) in [0, 1]: a tensor (N,)."""
    if x.shape != y.shape:
        raise InputError(f"SSIM needs images of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise InputError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    return ssim(x.double(), y.double(), data_range=1.0, size_average=False, win_size=WINDOW,
                win_sigma=SIGMA).float()


def mssim(x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean SSIM over a dataset of image pairs."""
    total = 0.0
    for sl in batch_slices(len(x), batch_size):
        total += float(ssim_per_image(x[sl], y[sl]).sum())
    return total / len(x)


def mssim_table(x: torch.Tensor, directions: torch.Tensor, grid: Sequence[float],
                batch_size: int = 1000) -> list[float]:
    """MSSIM between ``x`` and ``perturb(x, directions, ε)`` for every ε of ``grid``."""
    check_images(x)
    grid = check_strengths(grid)
    if directions.shape != x.shape:
        raise InputError(f"directions {tuple(directions.shape)} do not match images "
                         f"{tuple(x.shape)}")
    totals = [0.0] * len(grid)
    for sl in batch_slices(len(x), batch_size):
        xb, db = x[sl], directions[sl]
        for j, eps in enumerate(grid):
            totals[j] += float(ssim_per_image(xb, perturb(xb, db, eps)).sum())
    return [t / len(x) for t in totals]


def strength_bound(grid: Sequence[float], table: Sequence[float], tau: float) -> float:
    """The largest ε of ``grid`` (ascending) up to which MSSIM stays ≥ ``tau``."""
    if len(grid) != len(table) or not grid:
        raise InputError("grid and MSSIM table must be non-empty and of equal length")
    bound = grid[0]
    for eps, value in zip(grid, table, strict=True):
        if value < tau:
            break
        bound = eps
    return float(bound)
