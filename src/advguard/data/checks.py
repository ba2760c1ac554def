"""Validation of images and labels at the API boundary (SPEC conventions: float NCHW in [0, 1])."""

from __future__ import annotations

import numpy as np
import torch

from advguard.errors import InputError


def check_images(x: torch.Tensor, *, channels: int | None = None,
                 size: tuple[int, int] | None = None, name: str = "images") -> None:
    """Raise :class:`InputError` unless ``x`` is a float tensor ``(N, C, H, W)`` in [0, 1].

    ``channels`` and ``size`` (H, W), when given, must match too.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be float32 (floating point in [0, 1]), got dtype "
                         f"{x.dtype} (convert uint8 images with x.float() / 255)")
    if x.dtype != torch.float32:
        raise InputError(f"{name} must be float32 like the models' weights, got {x.dtype} "
                         "(convert with x.float())")
    values: torch.Tensor | np.ndarray = x
    if x.device.type == "cpu":
        try:
            values = x.detach().numpy()
        except (RuntimeError, TypeError):  # views NumPy cannot hold (sparse, transformed)
            values = x
    check_pixels(values, channels=channels, size=size, name=name)


def check_pixels(values: torch.Tensor | np.ndarray, *, channels: int | None = None,
                 size: tuple[int, int] | None = None, name: str = "images") -> None:
    """The checks of :func:`check_images` past the type: shape ``(N, C, H, W)`` (of
    ``channels`` and ``size`` where given), not empty, finite, in [0, 1] — of a tensor's
    values, or of a float NumPy array's before it becomes one. On the CPU they are read through
    NumPy: each torch call hands the interpreter lock back and waits for it again, and the
    service's event loop checks every request while its inference and admission threads hold
    that lock (a third of the time of NumPy's three calls under load)."""
    shape = tuple(values.shape)
    if len(shape) != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got {shape}")
    if channels is not None and shape[1] != channels:
        raise InputError(f"{name} have {shape[1]} channels, the model expects {channels} "
                         f"(shape {shape})")
    if size is not None and shape[2:] != tuple(size):
        raise InputError(f"{name} are {shape[2]}x{shape[3]}, the model expects "
                         f"{size[0]}x{size[1]} (shape {shape})")
    if 0 in shape:
        raise InputError(f"{name} are empty (shape {shape})")
    if isinstance(values, np.ndarray):
        finite = bool(np.isfinite(values).all())
    else:
        finite = bool(torch.isfinite(values).all())
    if not finite:
        raise InputError(f"{name} contain NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(advguard expects un-normalised pixels; normalisation is in the model)")


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> None:
    """Raise :class:`InputError` unless ``y`` is an integer tensor ``(n,)`` of valid classes."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise InputError(f"labels must be an integer tensor, got "
                         f"{getattr(y, 'dtype', type(y).__name__)}")
    if tuple(y.shape) != (n,):
        raise InputError(f"labels must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if num_classes is not None and n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes - 1}], "
                         f"got [{int(y.min())}, {int(y.max())}]")
