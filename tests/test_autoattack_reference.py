"""The evaluation of record agrees with the authors' AutoAttack (pyautoattack, a packaging of
fra31/auto-attack): torchattacks' four attacks, configured as the reference standard version
configures its own, give the same robust accuracy on a fixed model and slice."""

from __future__ import annotations

import pytest
import torch

from advguard.evaluation import AutoAttack

EPS = 0.08  # leaves the MLP about 40% robust: the attacks have work to do on every image


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.x[:100], mnist_test.y[:100]


def test_torchattacks_and_the_reference_agree_at_the_standard_budgets(trained_mlp, images):
    x, y = images[0][:60], images[1][:60]  # every image counts 1.7 points: they must be equal
    ours = AutoAttack(square_alone=False).evaluate(trained_mlp, x, y, EPS, batch_size=60)
    ref = AutoAttack(square_alone=False, implementation="reference").evaluate(
        trained_mlp, x, y, EPS, batch_size=60)
    assert ours.standard and ref.standard
    assert ref.implementation.startswith("pyautoattack")
    assert ours.implementation.startswith("torchattacks")
    assert 0.2 < ref.robust_accuracy < ref.clean_accuracy - 0.2  # a slice that tells them apart
    for name in ref.robust_after:  # every step of the sequence, not only the end
        assert abs(ours.robust_after[name] - ref.robust_after[name]) <= 0.005, name
    # and the images each returns are judged alike by the model
    with torch.no_grad():
        assert torch.equal(trained_mlp(ours.adv).argmax(1) == y, ours.robust)
        assert (ours.adv - x).abs().amax() <= EPS + 1e-6
        assert torch.equal(trained_mlp(ref.adv).argmax(1) == y, ref.robust)


def test_square_is_configured_as_the_reference_not_as_torchattacks_default(trained_mlp, images):
    """torchattacks' Square rescales its schedule by default (resc_schedule=True); the reference
    standard version does not, and on this slice the two differ — the configuration matters."""
    import torchattacks

    x, y = images

    def alone(attack) -> float:
        with torch.no_grad():
            return float((trained_mlp(attack(x, y)).argmax(1) == y).float().mean())

    queries = 1000  # a fifth of the standard budget keeps it quick; the schedules still differ
    ours = AutoAttack(queries=queries)._attacks(trained_mlp, EPS, 10)["Square"]
    ref = AutoAttack(queries=queries, implementation="reference")._attacks(
        trained_mlp, EPS, 10)["Square"]
    default = torchattacks.Square(trained_mlp, norm="Linf", eps=EPS, n_queries=queries,
                                  p_init=0.8, seed=0)
    assert abs(alone(ours) - alone(ref)) <= 0.005
    assert abs(alone(default) - alone(ref)) >= 0.01


def test_unknown_implementation_is_refused():
    from advguard.errors import InputError

    with pytest.raises(InputError, match="implementation must be one of"):
        AutoAttack(implementation="foolbox")
