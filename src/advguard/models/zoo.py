"""The papers' architectures (SPEC A2), each a plain ``nn.Sequential`` behind an input layer.

Every model starts with :class:`InputNorm`, which checks the input's shape and channel count and
applies the dataset's mean/std, so that callers always pass pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from advguard.data import DatasetInfo, dataset_info
from advguard.errors import InputError


class InputNorm(nn.Module):
    """Check ``(N, C, H, W)`` against the expected shape, then normalise per channel."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__()
        self.channels = info.channels
        self.size = tuple(info.size)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or tuple(x.shape[2:]) != self.size:
            raise InputError(
                f"model expects images of shape (N, {self.channels}, {self.size[0]}, "
                f"{self.size[1]}), got {tuple(x.shape)}")
        return (x - self.mean) / self.std


def _conv_blocks(channels: list[int], bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return layers


def lenet5(info: DatasetInfo) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998): the MNIST crafting model. 2 conv + 3 FC."""
    h, w = info.size
    flat = 16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2)
    return nn.Sequential(
        InputNorm(info),
        nn.Conv2d(info.channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, info.num_classes),
    )


def mlp3(info: DatasetInfo, hidden: int = 512) -> nn.Sequential:
    """3-layer MLP (two hidden ReLU layers + output): the MNIST victim."""
    d = info.channels * info.size[0] * info.size[1]
    return nn.Sequential(
        InputNorm(info), nn.Flatten(),
        nn.Linear(d, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, info.num_classes),
    )


def small_cnn(info: DatasetInfo) -> nn.Sequential:
    """LeNet-size CNN for white-box robustness: 2 strided conv 4×4 (16/32 channels) + FC 100
    (the MNIST network of Wong et al. 2020, "Fast is better than free"); 166k weights on MNIST."""
    h, w = info.size
    return nn.Sequential(
        InputNorm(info),
        nn.Conv2d(info.channels, 16, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 100), nn.ReLU(inplace=True),
        nn.Linear(100, info.num_classes),
    )


def trades_cnn(info: DatasetInfo) -> nn.Sequential:
    """TRADES' MNIST SmallCNN (Zhang et al. 2019): 4 conv 3×3 (32, 32, 64, 64 channels, max-pool
    after each pair), FC 200 → dropout 0.5 → FC 200; 312k weights on MNIST."""
    h, w = info.size
    return nn.Sequential(
        InputNorm(info),
        nn.Conv2d(info.channels, 32, 3), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2), 200),
        nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(inplace=True),
        nn.Linear(200, info.num_classes),
    )


# Widths are advguard's (the paper gives layer counts only), sized to train on 2 CPU cores.
def cifar_crafter(info: DatasetInfo) -> nn.Sequential:
    """CIFAR/SVHN crafting CNN: 3 × (conv 3×3 + BN + max-pool), 32/64/128 channels, 2 FC."""
    h, w = info.size
    return nn.Sequential(
        InputNorm(info), *_conv_blocks([info.channels, 32, 64, 128], bn=True), nn.Flatten(),
        nn.Linear(128 * (h // 8) * (w // 8), 256), nn.ReLU(inplace=True),
        nn.Linear(256, info.num_classes),
    )


def cifar_victim(info: DatasetInfo) -> nn.Sequential:
    """CIFAR victim CNN: 3 conv (16/32/64 channels), 3 pool, 1 FC ("inner product") layer."""
    h, w = info.size
    return nn.Sequential(
        InputNorm(info), *_conv_blocks([info.channels, 16, 32, 64], bn=False), nn.Flatten(),
        nn.Linear(64 * (h // 8) * (w // 8), info.num_classes),
    )


def svhn_victim(info: DatasetInfo) -> nn.Sequential:
    """SVHN victim CNN: 3 conv (16/32/64 channels), 3 pool, 2 FC layers."""
    h, w = info.size
    return nn.Sequential(
        InputNorm(info), *_conv_blocks([info.channels, 16, 32, 64], bn=False), nn.Flatten(),
        nn.Linear(64 * (h // 8) * (w // 8), 128), nn.ReLU(inplace=True),
        nn.Linear(128, info.num_classes),
    )


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True), *([nn.MaxPool2d(2)] if pool else [])]


def resnet_small(info: DatasetInfo, width: int = 16) -> nn.Sequential:
    """A small ResNet for natural images: the 9-layer residual network of the DAWNBench
    CIFAR-10 entries (Page 2018; prep conv, 3 pooled stages, residual blocks after the first
    and last) at a quarter of its width (16/32/64/128 channels, 0.41M weights) so that it trains
    on 2 CPU cores; global max-pool, one FC layer."""
    w = [width, 2 * width, 4 * width, 8 * width]
    return nn.Sequential(
        InputNorm(info), *_conv_bn(info.channels, w[0]),
        *_conv_bn(w[0], w[1], pool=True),
        Residual(nn.Sequential(*_conv_bn(w[1], w[1]), *_conv_bn(w[1], w[1]))),
        *_conv_bn(w[1], w[2], pool=True),
        *_conv_bn(w[2], w[3], pool=True),
        Residual(nn.Sequential(*_conv_bn(w[3], w[3]), *_conv_bn(w[3], w[3]))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w[3], info.num_classes),
    )


MODELS: dict[str, Callable[[DatasetInfo], nn.Sequential]] = {
    "resnet-s": resnet_small,
    "lenet5": lenet5,
    "mlp3": mlp3,
    "small-cnn": small_cnn,
    "trades-cnn": trades_cnn,
    "cifar-crafter": cifar_crafter,
    "cifar-victim": cifar_victim,
    "svhn-victim": svhn_victim,
}

def model_for(dataset: str, role: str) -> str:
    """The architecture name playing ``role`` ('crafter' or 'victim') on ``dataset`` (SPEC A2,
    declared on the dataset's :class:`~advguard.data.DatasetInfo`)."""
    info = dataset_info(dataset)
    if role not in ("crafter", "victim"):
        raise InputError(f"unknown model role {role!r}; choose 'crafter' or 'victim'")
    return str(getattr(info, role))
