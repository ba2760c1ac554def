"""Deep features φ(x) of the attacked model (SPEC B1): a forward hook on a named layer.

The default layer is the last convolutional block (the module after the last ``Conv2d``'s block:
its last pooling/activation module before ``Flatten``) or, for a model without convolutions, the
penultimate layer's output (the input of the last ``Linear``). 4-D activations are
global-average-pooled over space, so φ(x) is (N, D).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advguard.batching import batch_slices
from advguard.data import as_dataset, batches
from advguard.errors import InputError
from advguard.models import eval_mode


@dataclass(frozen=True)
class LayerSpec:
    """A named module of the model; ``inputs`` hooks its input instead of its output."""

    name: str
    inputs: bool = False


def default_layer(model: nn.Module) -> LayerSpec:
    """The last convolutional block's output, or the input of the last ``Linear`` for MLPs."""
    modules = list(model.named_modules())
    conv_at = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if conv_at:
        block_end = conv_at[-1]
        for i in range(conv_at[-1] + 1, len(modules)):
            if isinstance(modules[i][1], (nn.Flatten, nn.Linear, nn.Conv2d)):
                break
            block_end = i
        return LayerSpec(modules[block_end][0])
    linear = [name for name, m in modules if isinstance(m, nn.Linear)]
    if not linear:
        raise InputError("the model has neither Conv2d nor Linear layers; name a layer")
    return LayerSpec(linear[-1], inputs=True)


def resolve_layer(model: nn.Module, layer: str | LayerSpec | None) -> LayerSpec:
    spec = default_layer(model) if layer is None else (
        layer if isinstance(layer, LayerSpec) else LayerSpec(layer))
    names = dict(model.named_modules())
    if spec.name not in names:
        raise InputError(f"the model has no layer {spec.name!r}; layers: "
                         + ", ".join(n for n in names if n))
    return spec


def pool_features(t: torch.Tensor) -> torch.Tensor:
    """φ as (N, D): global average pooling of 4-D activations, flattening otherwise."""
    return t.mean(dim=(2, 3)) if t.ndim == 4 else t.flatten(1)


class FeatureCapture:
    """Inside ``with FeatureCapture(model, layer) as cap``, every forward pass of ``model``
    stores φ of its batch in ``cap.features`` (pooled, gradients kept)."""

    def __init__(self, model: nn.Module, layer: str | LayerSpec | None = None) -> None:
        self.spec = resolve_layer(model, layer)
        self.module = dict(model.named_modules())[self.spec.name]
        self.last: torch.Tensor | None = None

    def __enter__(self) -> FeatureCapture:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.last = pool_features(args[0] if self.spec.inputs else out)

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    @property
    def features(self) -> torch.Tensor:
        """φ of the last forward pass."""
        if self.last is None:
            raise InputError("no forward pass ran inside the feature capture")
        return self.last


@torch.no_grad()
def extract_outputs(model: nn.Module, x: torch.Tensor, layer: str | LayerSpec | None = None, *,
                    batch_size: int = 1000, device: str | torch.device = "cpu",
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, logits (N, classes))`` of ``model`` on ``x``, one forward
    pass per batch."""
    feats, logits = [], []
    with eval_mode(model), FeatureCapture(model, layer) as cap:
        for sl in batch_slices(len(x), batch_size, progress=progress, desc="features"):
            logits.append(model(x[sl].to(device)).float().cpu())
            feats.append(cap.features.float().cpu())
    return torch.cat(feats), torch.cat(logits)


def extract_features(model: nn.Module, x: torch.Tensor, layer: str | LayerSpec | None = None, *,
                     batch_size: int = 1000, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, predicted classes (N,))`` of ``model`` on ``x``."""
    features, logits = extract_outputs(model, x, layer, batch_size=batch_size, device=device,
                                       progress=progress)
    return features, logits.argmax(1)


def dataset_features(model: nn.Module, data: Any, layer: str | LayerSpec | None = None, *,
                     chunk_size: int = 10_000, batch_size: int = 1000,
                     device: str | torch.device = "cpu", workers: int | None = None,
                     progress: bool = False, predictions: bool = False) -> Iterator[tuple]:
    """φ of a Dataset or DataLoader of ``(image, label)``, in chunks of about ``chunk_size``
    rows: ``(features (n, D) float32, labels (n,))`` numpy arrays, plus the predicted classes
    with ``predictions``. Images are read ``batch_size`` at a time (``workers`` DataLoader
    workers); memory holds one chunk of features, never the images."""
    from tqdm.auto import tqdm

    dataset, loader_workers = as_dataset(data)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    held = 0

    def chunk() -> tuple:
        f, y, p = (torch.cat(t).numpy() for t in zip(*parts, strict=True))
        return (f, y, p) if predictions else (f, y)

    for x, y, _ in tqdm(batches(dataset, batch_size=batch_size,
                                workers=loader_workers if workers is None else workers),
                        total=-(-len(dataset) // batch_size), desc="features",
                        disable=not progress, leave=False):
        features, predicted = extract_features(model, x, layer, batch_size=batch_size,
                                               device=device)
        parts.append((features, y, predicted))
        held += len(y)
        if held >= chunk_size:
            yield chunk()
            parts, held = [], 0
    if parts:
        yield chunk()
