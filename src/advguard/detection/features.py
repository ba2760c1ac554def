"""Deep features φ(x) of the attacked model (SPEC B1): a forward hook on a named layer.

The default layer is the last convolutional block (the module after the last ``Conv2d``'s block:
its last pooling/activation module before ``Flatten``) or, for a model without convolutions, the
penultimate layer's output (the input of the last ``Linear``). 4-D activations are
global-average-pooled over space, so φ(x) is (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks import eval_mode
from advguard.errors import InputError


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


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, layer: str | LayerSpec | None = None, *,
                     batch_size: int = 1000, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, predicted classes (N,))`` of ``model`` on ``x``."""
    spec = resolve_layer(model, layer)
    module = dict(model.named_modules())[spec.name]
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured.append(pool_features(args[0] if spec.inputs else out).float().cpu())

    handle = module.register_forward_hook(hook)
    preds = []
    try:
        with eval_mode(model):
            for s in tqdm(range(0, len(x), batch_size), desc="features", disable=not progress,
                          leave=False):
                preds.append(model(x[s:s + batch_size].to(device)).argmax(1).cpu())
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(preds)
