"""Running a model for its predictions: eval mode restored afterwards, batched, on any device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from advguard.batching import map_batches
from advguard.data import as_dataset, batches
from advguard.errors import InputError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its previous train/eval mode afterwards (a model
    wholly in eval mode already is left alone: switching walks every module twice, a fifth of
    a LeNet-5's forward pass at batch 1, and the service's model is always in eval mode)."""
    if not any(m.training for m in model.modules()):
        try:
            yield model
        finally:
            if any(m.training for m in model.modules()):  # switched inside: back to eval
                model.eval()
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000,
            device: str | torch.device = "cpu", progress: bool = False,
            desc: str = "predict") -> torch.Tensor:
    """Predicted classes (N,) of ``model`` in eval mode on images ``x``, on the CPU."""
    with eval_mode(model):
        return map_batches(lambda xb: model(xb).argmax(1), x, batch_size=batch_size,
                           device=device, progress=progress, desc=desc)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Bool (N,): where ``model`` classifies ``x`` as ``y``."""
    return predict(model, x, **kwargs) == y.cpu()  # type: ignore[arg-type]


def accuracy(model: nn.Module, x: Any, y: torch.Tensor | None = None,
             **kwargs: Any) -> float:
    """Fraction of ``x`` that ``model`` (in eval mode) classifies as ``y``; ``x`` may also be a
    Dataset or DataLoader of ``(image, label)`` (``y`` omitted), read batch by batch."""
    if y is None:
        predicted, labels = predict_dataset(model, x, **kwargs)
        return float((predicted == labels).double().mean())
    if len(x) == 0:
        return 0.0
    return float(correct(model, x, y, **kwargs).double().mean())


@torch.no_grad()
def predict_dataset(model: nn.Module, data: Any, *, batch_size: int = 1000,
                    device: str | torch.device = "cpu", workers: int | None = None,
                    progress: bool = False, desc: str = "predict",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted classes, labels)`` (N,) of ``model`` on a Dataset or DataLoader, streamed
    ``batch_size`` images at a time, fewer for large images (``workers``: DataLoader worker
    processes; default: the DataLoader's, or none)."""
    from tqdm.auto import tqdm

    dataset, loader_workers = as_dataset(data)
    out, labels = [], []
    with eval_mode(model):
        for x, y, _ in tqdm(batches(dataset, batch_size=batch_size,
                                    workers=loader_workers if workers is None else workers),
                            desc=desc, disable=not progress, leave=False):
            out.append(model(x.to(device)).argmax(1).cpu())
            labels.append(y)
    return torch.cat(out), torch.cat(labels)


def check_takes(model: nn.Module, shape: tuple[int, ...], num_classes: int,
                device: str | torch.device = "cpu") -> None:
    """Refuse, before any work, data whose images ``model`` cannot take or whose classes it
    does not have: one line naming both shapes, not a traceback from inside the model."""
    c, h, w = shape
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(torch.zeros(1, c, h, w, device=device))
    except (RuntimeError, InputError) as exc:  # torch's own, or a model's own check
        hint = {1: " (grey images: a colour model repeats them with --channels 3, or "
                   "v2.Grayscale(3) in the transform)",
                3: " (colour images for a grey model? add v2.Grayscale() to the transform, "
                   "or --channels 1)"}.get(c, "")
        raise InputError(f"the model cannot take the data's {c}x{h}x{w} images{hint}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError("the model must return logits of shape (N, classes), got "
                         f"{getattr(out, 'shape', type(out).__name__)}: wrap(model) picks "
                         "them out of a tuple, a dict or .logits")
    if out.shape[1] < num_classes:
        raise InputError(f"the model has {out.shape[1]} outputs and the data {num_classes} "
                         "classes")
