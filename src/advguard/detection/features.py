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

import numpy as np
import torch
from torch import nn

from advguard.batching import batch_slices
from advguard.data import as_dataset, batches, fitting_batch
from advguard.errors import InputError
from advguard.models import eval_mode


@dataclass(frozen=True)
class LayerSpec:
    """A named module of the model; ``inputs`` hooks its input instead of its output."""

    name: str
    inputs: bool = False


def is_transformer(model: nn.Module) -> bool:
    """A model built of attention blocks (ViT, Swin, timm's or Hugging Face's), or any Hugging
    Face model (whose convolutional ones, ConvNeXt's, keep channels last inside their blocks)."""
    return any("Attention" in type(m).__name__ or "PreTrainedModel" in
               {c.__name__ for c in type(m).__mro__} for m in model.modules())


def default_layer(model: nn.Module) -> LayerSpec:
    """The last convolutional block's output, or the input of the last ``Linear`` for MLPs;
    for a transformer, the input of its classifier — the last block's output as the model
    itself pools it (the CLS token of a ViT, the mean over tokens or pixels of a Swin or a
    ConvNeXt), not the patch-embedding convolution of its stem."""
    modules = list(model.named_modules())
    linear = [name for name, m in modules if isinstance(m, nn.Linear)]
    if linear and is_transformer(model):
        return LayerSpec(linear[-1], inputs=True)
    conv_at = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if conv_at:
        block_end = conv_at[-1]
        for i in range(conv_at[-1] + 1, len(modules)):
            if isinstance(modules[i][1], (nn.Flatten, nn.Linear, nn.Conv2d)):
                break
            block_end = i
        return LayerSpec(modules[block_end][0])
    if not linear:
        raise InputError("the model has neither Conv2d nor Linear layers; name a layer")
    return LayerSpec(linear[-1], inputs=True)


def default_layers(model: nn.Module, most: int = 4) -> list[LayerSpec]:
    """Several depths for the multi-layer detectors, at most ``most`` of them evenly spread,
    the deepest always included: the outputs of the model's stages where its top level holds
    two or more modules with convolutions inside (a ResNet's ``layer1`` … ``layer4``; Lee et
    al. read the end of every stage), else the end of every convolutional block (as
    :func:`default_layer` finds the last); and the input of the last ``Linear``."""
    def has_conv(m: nn.Module) -> bool:
        return any(isinstance(c, nn.Conv2d) for c in m.modules())

    stages = [LayerSpec(n) for n, m in model.named_children()
              if list(m.children()) and has_conv(m)]
    modules = list(model.named_modules())
    ends: list[LayerSpec] = stages if len(stages) >= 2 else []
    conv_at = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    for n, at in enumerate(conv_at if not ends else []):
        stop = conv_at[n + 1] if n + 1 < len(conv_at) else len(modules)
        end = at
        for i in range(at + 1, stop):
            if isinstance(modules[i][1], (nn.Flatten, nn.Linear, nn.Conv2d)) or (
                    list(modules[i][1].children())):
                break
            end = i
        ends.append(LayerSpec(modules[end][0]))
    linear = [name for name, m in modules if isinstance(m, nn.Linear)]
    # without convolutions, the hidden layers: the input of every Linear but the first
    ends += [LayerSpec(n, inputs=True) for n in (linear[-1:] if ends or conv_at else linear[1:])]
    if not ends:
        raise InputError("the model has no hidden Conv2d or Linear layer; name the layers")
    ends = list(dict.fromkeys(ends))
    if len(ends) <= most:
        return ends
    picks = sorted({round(i * (len(ends) - 1) / (most - 1)) for i in range(most)})
    return [ends[i] for i in picks]


def resolve_layers(model: nn.Module, layers: tuple[str | LayerSpec, ...] | list | None,
                   most: int = 4) -> list[LayerSpec]:
    """Named layers (a name ending in ``:in`` hooks that module's input), or the defaults."""
    if not layers:
        return default_layers(model, most)
    return [resolve_layer(model, layer if isinstance(layer, LayerSpec) else
                          LayerSpec(layer[:-3], inputs=True) if layer.endswith(":in")
                          else LayerSpec(layer)) for layer in layers]


def layer_key(spec: LayerSpec) -> str:
    """How a layer is named in files and tables."""
    return spec.name + (":in" if spec.inputs else "")


def resolve_layer(model: nn.Module, layer: str | LayerSpec | None) -> LayerSpec:
    spec = default_layer(model) if layer is None else (
        layer if isinstance(layer, LayerSpec) else LayerSpec(layer))
    names = dict(model.named_modules())
    if spec.name not in names:
        raise InputError(f"the model has no layer {spec.name!r}; layers: "
                         + ", ".join(n for n in names if n))
    return spec


def pool_features(t: Any) -> torch.Tensor:
    """φ as (N, D): global average pooling of 4-D activations, the mean over tokens of a
    transformer block's (N, tokens, D), flattening otherwise; a block that returns a tuple
    (or an output object) is read at its first tensor (its hidden states)."""
    if not isinstance(t, torch.Tensor):
        t = getattr(t, "last_hidden_state", None) if not isinstance(t, tuple | list) else (
            t[0] if t else None)
        if not isinstance(t, torch.Tensor):
            raise InputError("the layer returns no tensor (nor a tuple starting with one): "
                             "name another layer")
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.mean(dim=1) if t.ndim == 3 else t.flatten(1)


class FeatureCapture:
    """Inside ``with FeatureCapture(model, layer) as cap``, every forward pass of ``model``
    stores φ of its batch in ``cap.features`` (pooled, gradients kept)."""

    def __init__(self, model: nn.Module, layer: str | LayerSpec | None = None) -> None:
        self.spec = resolve_layer(model, layer)
        self.module = dict(model.named_modules())[self.spec.name]
        self.last: torch.Tensor | None = None

    def __enter__(self) -> FeatureCapture:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
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


class LayersCapture:
    """:class:`FeatureCapture` at several layers: ``cap.features`` maps :func:`layer_key` to φ of
    the last forward pass (gradients kept, so an attack can differentiate through it)."""

    def __init__(self, model: nn.Module, layers: list[LayerSpec]) -> None:
        self.captures = [FeatureCapture(model, spec) for spec in layers]

    def __enter__(self) -> LayersCapture:
        for cap in self.captures:
            cap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for cap in self.captures:
            cap.__exit__()

    @property
    def features(self) -> dict[str, torch.Tensor]:
        return {layer_key(cap.spec): cap.features for cap in self.captures}


@torch.no_grad()
def extract_layers(model: nn.Module, x: torch.Tensor, layers: list[LayerSpec], *,
                   batch_size: int = 1000, device: str | torch.device = "cpu"
                   ) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """``({layer: features (N, D_layer) float32}, logits)``: one forward pass per batch."""
    parts: dict[str, list[torch.Tensor]] = {layer_key(s): [] for s in layers}
    logits = []
    with eval_mode(model), LayersCapture(model, layers) as cap:
        for sl in batch_slices(len(x), batch_size):
            logits.append(model(x[sl].to(device)).float().cpu())
            for key, f in cap.features.items():
                parts[key].append(f.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}, torch.cat(logits)


def dataset_layers(model: nn.Module, data: Any, layers: list[LayerSpec], *,
                   chunk_size: int = 10_000, batch_size: int = 1000,
                   device: str | torch.device = "cpu", workers: int | None = None,
                   progress: bool = False) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray,
                                                             np.ndarray]]:
    """:func:`extract_layers` over a Dataset or DataLoader of ``(image, label)``, streamed in
    chunks of about ``chunk_size`` rows: ``({layer: features}, labels, logits)``."""
    from tqdm.auto import tqdm

    dataset, loader_workers = as_dataset(data)
    parts: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]] = []

    def chunk() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        return ({k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]},
                np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))

    for x, y, _ in tqdm(batches(dataset, batch_size=batch_size,
                                workers=loader_workers if workers is None else workers),
                        total=-(-len(dataset) // fitting_batch(dataset, batch_size)),
                        desc="features",
                        disable=not progress, leave=False):
        feats, logits = extract_layers(model, x, layers, batch_size=batch_size, device=device)
        parts.append((feats, np.asarray(y), logits.numpy()))
        if sum(len(p[1]) for p in parts) >= chunk_size:
            yield chunk()
            parts = []
    if parts:
        yield chunk()


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
                        total=-(-len(dataset) // fitting_batch(dataset, batch_size)),
                        desc="features",
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
