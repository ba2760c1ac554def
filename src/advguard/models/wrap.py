"""A user's model as advguard takes every model: images in [0, 1] in, logits out.

:func:`wrap` moves the normalisation a user applied outside the model (``transforms.Normalize``)
inside it, and picks the logits out of whatever the model returns — a tensor, a tuple, a dict
(Hugging Face's ``{"logits": …}``) or an object with ``.logits`` — once, at the boundary, so
nothing downstream (attacks, training, detectors, the guard) cares what the model was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advguard.errors import InputError

Output = str | int | Callable[[Any], torch.Tensor] | None


def pick_logits(out: Any, output: Output = None) -> torch.Tensor:
    """The logits in a model's output: ``output`` is a key or attribute name, a position, or a
    function; ``None`` takes a tensor as is, ``["logits"]`` or a dict's only tensor, ``.logits``,
    or a tuple's first element."""
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if isinstance(out, torch.Tensor) and output == "logits":  # a plain model's output is
            return out  # its logits already
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        raise InputError(f"the model's output ({type(out).__name__}) has no {output!r}")
    if isinstance(output, int):
        if isinstance(out, Sequence) and -len(out) <= output < len(out):
            return out[output]
        raise InputError(f"the model's output ({type(out).__name__}) has no item {output}")
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise InputError(f"the model returns a dict with keys {list(out)}: say which holds the "
                         "logits (wrap(model, output='KEY'))")
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Sequence) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"cannot find logits in the model's output ({type(out).__name__}): "
                     "wrap(model, output=KEY, INDEX or a function)")


class Wrapped(nn.Module):
    """``logits = pick(module((x − mean) / std))`` for images ``x`` in [0, 1]; grey images are
    repeated to ``expand_channels`` channels first when the module takes colour."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, module: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, output: Output = None, *,
                 expand_channels: int | None = None) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise InputError("give both mean and std, or neither")
        if std is not None and any(not s > 0 for s in std):
            raise InputError(f"std must be positive, got {list(std)}")
        if mean is not None and std is not None and len(mean) != len(std):
            raise InputError(f"mean has {len(mean)} channels, std {len(std)}")
        self.module = module
        self.output = output
        self.expand_channels = expand_channels
        self.register_buffer("mean", torch.tensor(
            [0.0] if mean is None else [float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(
            [1.0] if std is None else [float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.expand_channels is not None and x.shape[1] == 1:
            x = x.expand(-1, self.expand_channels, -1, -1)
        return pick_logits(self.module(x), self.output)


def wrap(module: nn.Module, *, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None, output: Output = None) -> Wrapped:
    """A user's ``module`` as an advguard model (images in [0, 1] → logits).

    ``mean``/``std``: the per-channel normalisation the module expects its inputs to have had
    (it now happens inside, so attacks and strengths stay in pixel units); ``output``: where the
    logits are in what the module returns (see :func:`pick_logits`)."""
    if not isinstance(module, nn.Module):
        raise InputError(f"wrap takes a torch.nn.Module, got {type(module).__name__}")
    return Wrapped(module, mean, std, output)
