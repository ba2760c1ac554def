from __future__ import annotations

import pytest

from advguard.attacks import PGD, fgsm, fgsm_directions
from advguard.data import strength_grid
from advguard.evaluation import (
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
)
from advguard.models import accuracy


def test_strength_grids_are_the_papers():
    assert strength_grid(0.3, 0.03) == [0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24,
                                        0.27, 0.3]
    cifar = strength_grid(5 / 255, 0.5 / 255)
    assert len(cifar) == 11 and cifar[-1] == pytest.approx(5 / 255)
    assert grid_mean([1.0, 0.5, 0.0]) == 0.5


def test_fgsm_curve_matches_attack_by_attack(trained_mlp, mnist_test):
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    grid = [0.0, 0.1, 0.25]
    curve = fgsm_curve(trained_mlp, x, y, grid, batch_size=64)
    want = [accuracy(trained_mlp, fgsm(trained_mlp, x, y, e), y) for e in grid]
    assert curve == pytest.approx(want, abs=1e-9)
    assert curve[0] == pytest.approx(accuracy(trained_mlp, x, y))
    assert curve[0] > curve[1] > curve[2]


def test_transfer_curve_uses_the_crafting_models_directions(trained_mlp, trained_lenet,
                                                           mnist_test):
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    transfer = fgsm_curve(trained_mlp, x, y, [0.2], crafter=trained_lenet)
    want = accuracy(trained_mlp, fgsm(trained_lenet, x, y, 0.2), y)
    assert transfer == [pytest.approx(want)]
    d = fgsm_directions(trained_lenet, x, y)
    assert curve_from_directions(trained_mlp, x, y, d, [0.2]) == transfer
    # a transferred attack is weaker than the white-box one on the victim itself
    assert transfer[0] > fgsm_curve(trained_mlp, x, y, [0.2])[0]


def test_pgd_curve(trained_mlp, mnist_test):
    x, y = mnist_test.x[:100], mnist_test.y[:100]
    attack = PGD(steps=5, seed=1)
    curve = pgd_curve(trained_mlp, x, y, [0.0, 0.1], attack, batch_size=100)
    assert curve[0] == pytest.approx(accuracy(trained_mlp, x, y))
    assert curve[1] == pytest.approx(accuracy(trained_mlp, attack(trained_mlp, x, y, 0.1), y))
    assert curve[1] <= fgsm_curve(trained_mlp, x, y, [0.1])[0]


def test_curves_restore_model_mode(trained_mlp, mnist_test):
    trained_mlp.train()
    try:
        fgsm_curve(trained_mlp, mnist_test.x[:20], mnist_test.y[:20], [0.1])
        pgd_curve(trained_mlp, mnist_test.x[:20], mnist_test.y[:20], [0.1], PGD(steps=2))
        assert trained_mlp.training
    finally:
        trained_mlp.eval()
