"""Shared fixtures: small real MNIST subsets and quickly trained tiny models (all seeded)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., CliResult]:
    """Run ``advguard ARGS…`` in this process (no interpreter start-up per call) through the
    console entry point, so its error handling is the one users get: ``cli("train", …)``."""
    from advguard.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["advguard", *args])
        monkeypatch.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def assert_one_line_error(result: CliResult, needle: str) -> None:
    """Exit status 2 and exactly one ``error: …`` line on stderr that contains ``needle``."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
