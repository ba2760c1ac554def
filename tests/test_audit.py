"""The robustness audit: independent attacks agree with advguard's PGD on an honest model and
the gradient-masking checks fire on a model that hides its gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advguard.attacks import PGD
from advguard.evaluation import audit


class Quantised(nn.Module):
    """Rounds its input to 8 levels before the model: the loss gradient is zero everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 7) / 7)


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.x[:120], mnist_test.y[:120]


def test_honest_model_passes_and_attacks_agree(trained_mlp, images):
    pytest.importorskip("torchattacks")
    x, y = images
    report = audit(trained_mlp, x, y, 0.1, pgd=PGD(steps=10, restarts=2), step_sweep=(5, 20),
                   batch_size=60)
    names = list(report.attacks)
    assert any(n.startswith("torchattacks PGD") for n in names)
    assert any("APGD-DLR" in n for n in names) and any("APGD-CE" in n for n in names)
    assert report.worst_case_accuracy <= min(report.attacks.values()) + 1e-9
    assert report.clean_accuracy > 0.8
    # on an MLP without masking the independent PGD and advguard's agree within a few points
    ours = report.attacks["advguard PGD-10 x2"]
    theirs = next(v for k, v in report.attacks.items() if k.startswith("torchattacks PGD"))
    assert abs(ours - theirs) < 0.1
    assert report.zero_gradient_fraction == 0 and report.unbounded_accuracy < 0.05
    assert report.warnings == []


def test_masked_gradients_are_flagged(trained_mlp, images):
    x, y = images
    masked = Quantised(trained_mlp).eval()
    report = audit(masked, x, y, 0.2, pgd=PGD(steps=10), attacks={}, step_sweep=(5, 20),
                   sources={"the unmasked model": trained_mlp}, batch_size=60)
    assert report.zero_gradient_fraction == 1.0
    assert report.transfer["the unmasked model"] < min(report.attacks.values())
    text = " ".join(report.warnings)
    assert "zero loss gradient" in text and "transfer from the unmasked model" in text
    assert "unbounded attack" in text
