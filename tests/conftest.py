"""Shared fixtures: small real MNIST subsets and quickly trained tiny models (all seeded)."""

from __future__ import annotations

import pytest
import torch

from advguard.data import ImageSet, load_dataset
from advguard.models import build_model
from advguard.training import StrengthMix, TrainConfig, train


@pytest.fixture(scope="session")
def mnist_train() -> ImageSet:
    return load_dataset("mnist", "train", limit=3000)


@pytest.fixture(scope="session")
def mnist_test() -> ImageSet:
    return load_dataset("mnist", "test", limit=500)


@pytest.fixture(scope="session")
def trained_mlp(mnist_train: ImageSet) -> torch.nn.Module:
    """An MLP trained for 2 epochs on 3,000 real MNIST images (~90% clean accuracy)."""
    torch.manual_seed(0)
    model = build_model("mlp3", "mnist")
    train(model, mnist_train, StrengthMix(), None, TrainConfig(epochs=2, batch_size=64),
          progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def trained_lenet(mnist_train: ImageSet) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_model("lenet5", "mnist")
    train(model, mnist_train, StrengthMix(), None, TrainConfig(epochs=2, batch_size=64),
          progress=False)
    return model.eval()
