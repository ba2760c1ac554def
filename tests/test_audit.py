"""The robustness audit: independent attacks agree with advguard's PGD on an honest model and
the gradient-masking checks fire on a model that hides its gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advguard.attacks import PGD, Attack
from advguard.evaluation import AutoAttack, audit

QUICK_AA = AutoAttack(steps=10, queries=300)  # the standard budgets are 100 steps, 5,000 queries


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
                   batch_size=60, autoattack=QUICK_AA)
    names = list(report.attacks)
    assert any(n.startswith("torchattacks PGD") for n in names)
    assert any("APGD-DLR" in n for n in names) and any("APGD-CE" in n for n in names)
    assert report.clean_accuracy > 0.8
    # on an MLP without masking the independent PGD and advguard's agree within a few points
    ours = report.attacks["advguard PGD-10 x2"]
    theirs = next(v for k, v in report.attacks.items() if k.startswith("torchattacks PGD"))
    assert abs(ours - theirs) < 0.1
    assert report.zero_gradient_fraction == 0 and report.unbounded_accuracy < 0.05
    assert report.warnings == []


class Overshoot(Attack):
    """A broken attack: its step goes 3ε from the image (and strongly fools the model)."""

    def perturb(self, model, x, y, eps):
        return (x + 3 * eps * torch.randn_like(x).sign()).clamp(0, 1)


def test_an_attack_leaving_the_ball_is_reported_not_counted(trained_mlp, images):
    x, y = images
    trained_mlp.train()
    try:
        report = audit(trained_mlp, x, y, 0.1, pgd=PGD(steps=5), step_sweep=(),
                       attacks={"overshoot": Overshoot()}, batch_size=60,
                       autoattack=AutoAttack(steps=2, queries=20), suite=True)
        assert trained_mlp.training  # the caller's mode is restored
    finally:
        trained_mlp.eval()
    assert "overshoot" not in report.attacks
    assert any("overshoot left the ε-ball" in w for w in report.warnings)
    assert set(report.attacks) == {"advguard PGD-5 x1", "AutoAttack (reduced budget)"}


def test_worst_case_is_the_per_example_minimum(trained_mlp, images):
    """Two attacks that each fool a different half: each alone leaves ~half, together none."""
    x, y = images

    class Half(Attack):
        def __init__(self, part: int) -> None:
            self.part = part

        def perturb(self, model, x, y, eps):
            adv = PGD(steps=10).craft(model, x, y, eps)
            keep = torch.arange(len(x), device=x.device) % 2 == self.part
            return torch.where(keep.view(-1, 1, 1, 1), adv, x)

    report = audit(trained_mlp, x, y, 0.3, pgd=PGD(steps=10), step_sweep=(),
                   attacks={"even": Half(0), "odd": Half(1)}, batch_size=60,
                   autoattack=AutoAttack(steps=1, queries=1), suite=True)
    assert report.attacks["even"] > 0.4 and report.attacks["odd"] > 0.4
    assert report.worst_case_accuracy < min(report.attacks["even"], report.attacks["odd"]) - 0.3


def test_masked_gradients_are_flagged(trained_mlp, images):
    x, y = images
    masked = Quantised(trained_mlp).eval()
    report = audit(masked, x, y, 0.2, pgd=PGD(steps=10), attacks={}, step_sweep=(5, 20),
                   sources={"the unmasked model": trained_mlp}, batch_size=60,
                   autoattack=QUICK_AA)
    assert report.zero_gradient_fraction == 1.0
    gradient = [v for k, v in report.attacks.items() if not k.startswith("AutoAttack")]
    assert report.transfer["the unmasked model"] < min(gradient)
    text = " ".join(report.warnings)
    assert "zero loss gradient" in text and "transfer from the unmasked model" in text
    assert "unbounded attack" in text
    # Square needs no gradient: it beats the gradient attacks, and AutoAttack says so
    aa = report.autoattack
    assert aa["square_alone_accuracy"] < aa["gradient_accuracy"] - 0.05
    assert "Square (black-box) alone" in text and report.masking_signal
    # and in the sequence Square fools images every gradient attack failed on
    assert aa["robust_after"]["Square"] < aa["robust_after"]["FAB-T"] - 0.05


def test_autoattack_counts_every_attack_and_stays_in_the_ball(trained_mlp, images):
    x, y = images
    result = QUICK_AA.evaluate(trained_mlp, x, y, 0.1, batch_size=50)
    after = list(result.robust_after.values())
    assert list(result.robust_after) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    # the first attack already breaks the MLP at ε = 0.1; the number is the per-image count
    assert after[0] < result.clean_accuracy - 0.1
    assert result.robust_accuracy == after[-1] == int(result.robust.sum()) / len(x)
    # the images it returns are what it counted: fooled examples carry an image that fools
    with torch.no_grad():
        right = trained_mlp(result.adv).argmax(1) == y
    assert torch.equal(right, result.robust)
    assert not result.standard and AutoAttack().standard
    assert result.to_json()["implementation"].startswith("torchattacks")
    # an honest model: Square does not beat the gradient attacks
    assert result.warnings == [] and not result.masking_signal


def test_autoattack_targets_every_other_class_when_there_are_fewer(trained_mlp, images):
    """Fewer classes than targets + 1 (a 4-class model): every class but the true one is a
    target, as in the reference; the targeted attacks are built with n_classes = 4."""
    from advguard.evaluation.autoattack import AutoAttack as AA

    x, y = images
    four = torch.nn.Sequential(trained_mlp, torch.nn.Linear(10, 4)).eval()
    built = AA(steps=1, queries=1)._attacks(four, 0.1, classes=4)
    assert built["APGD-T"].n_target_classes == 3
    result = AA(steps=1, queries=1).evaluate(four, x[:4], y[:4] % 4, 0.1)
    assert 0.0 <= result.robust_accuracy <= 1.0


def test_autoattack_slices_merge_into_the_whole_set(trained_mlp, images):
    """A long AutoAttack runs as slices (``audit --test-start``): merged, they give the run over
    the whole set — the same clean accuracy, robust accuracy within the random draws' noise,
    each accuracy weighted by its slice's size — and slices of different settings are refused."""
    from advguard.errors import InputError
    from advguard.evaluation import merge_results

    x, y = images
    whole = QUICK_AA.evaluate(trained_mlp, x, y, 0.1, batch_size=50).to_json()
    parts = [QUICK_AA.evaluate(trained_mlp, x[a:b], y[a:b], 0.1, batch_size=50).to_json()
             for a, b in ((0, 30), (30, 120))]
    merged = merge_results(parts)
    assert merged["images"] == 120
    assert merged["clean_accuracy"] == pytest.approx(whole["clean_accuracy"])
    assert merged["robust_accuracy"] == pytest.approx(
        (parts[0]["robust_accuracy"] * 30 + parts[1]["robust_accuracy"] * 90) / 120)
    assert abs(merged["robust_accuracy"] - whole["robust_accuracy"]) <= 3 / 120
    after = list(merged["robust_after"].values())
    assert after == sorted(after, reverse=True) and after[-1] == merged["robust_accuracy"]
    r = merged["robust_accuracy"]
    assert merged["standard_error"] == pytest.approx((r * (1 - r) / 120) ** 0.5)
    with pytest.raises(InputError, match="differ in eps"):
        merge_results([parts[0], {**parts[1], "eps": 0.2}])
