from __future__ import annotations

import re

import pytest
import torch

from advguard.attacks import (
    FGSM,
    LBFGS,
    PGD,
    Attack,
    RandomStartFGSM,
    fgsm,
    fgsm_directions,
    gradient_sign,
    perturb,
)
from advguard.errors import InputError
from advguard.models import accuracy, build_model

# Every attack advguard ships, through the one interface: attack(model, x, y, eps).
ATTACKS: dict[str, Attack] = {
    "fgsm": FGSM(),
    "pgd": PGD(steps=5),
    "pgd-restarts-no-start": PGD(steps=3, restarts=2, random_start=False),
    "pgd-fixed-step": PGD(steps=4, step_size=0.05),
    "pgd-targeted-early-stop": PGD(steps=3, targeted=True, early_stop=True),
    "fgsm-random-start": RandomStartFGSM(),
    "lbfgs": LBFGS(c_grid=(1.0,), binary_steps=0, max_iter=1),
}


@pytest.fixture
def batch(mnist_test):
    return mnist_test.x[:64], mnist_test.y[:64]


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("arch", ["mlp3", "lenet5"])
@pytest.mark.parametrize("training", [True, False])
def test_attack_invariants(name, eps, arch, training, batch):
    torch.manual_seed(0)
    model = build_model(arch, "mnist").train(training)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch
    if name == "lbfgs":  # a scipy solve per image: a few images keep it quick
        x, y = x[:8], y[:8]
    x_in = x.clone()
    adv = ATTACKS[name](model, x, y, eps)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert model.training is training
    assert torch.equal(x, x_in)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    if eps == 0.0:
        assert torch.equal(adv, x)


# The bounded attacks' own step (before the base class's projection) stays in the ε-ball and
# [0, 1]: the projection is a safety net, not what makes them correct. L-BFGS is unbounded.
@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "lbfgs"])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_bounded_attacks_step_stays_in_the_ball_unclipped(name, eps, trained_mlp, batch):
    x, y = batch
    attack = ATTACKS[name]
    raw = attack.perturb(trained_mlp, x, y, eps)
    assert (raw - x).abs().amax() <= eps * attack.reach + 1e-6
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    assert (raw - x).abs().amax() > 0.5 * eps  # it moved


class Overshoot(Attack):
    """An attack whose own step leaves the ε-ball and the image range."""

    def perturb(self, model, x, y, eps):
        return x + 3 * eps * (2 * torch.rand_like(x) - 1)


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_the_base_class_projects_what_a_subclass_returns(eps, trained_mlp, batch):
    x, y = batch
    attack = Overshoot()
    torch.manual_seed(0)
    raw = attack.perturb(trained_mlp, x, y, eps)
    assert (raw - x).abs().amax() > eps and raw.max() > 1.0  # the step really leaves both
    torch.manual_seed(0)
    adv = attack(trained_mlp, x, y, eps)
    assert (adv - x).abs().amax() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    # the projection is the nearest point: pixels the step left in range and ball are kept
    inside = ((raw - x).abs() <= eps) & (raw >= 0) & (raw <= 1)
    assert inside.any() and torch.equal(adv[inside], raw[inside])
    per_example = attack.craft(trained_mlp, x, y, torch.full((len(x),), eps).index_fill_(
        0, torch.tensor([0]), 0.0))  # one strength per example, as training asks
    assert torch.equal(per_example[0], x[0])
    assert (per_example[1:] - x[1:]).abs().amax() <= eps + 1e-6


class TurningLoss:
    """Cross-entropy for the first ``turn`` steps, its negative after: PGD climbs, then walks
    back towards the true class. It records which examples each iterate fools."""

    def __init__(self, turn: int) -> None:
        self.turn, self.fooled = turn, []

    def __call__(self, model, x, y):
        logits = model(x)
        self.fooled.append(logits.argmax(1) != y)
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return (ce if len(self.fooled) <= self.turn else -ce), logits


def test_pgd_keeps_the_best_iterate(trained_mlp, mnist_test):
    """Examples fooled at some step and not at the last are returned fooled with keep_best
    (the default) and not without it."""
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    rec_last, rec_best = TurningLoss(5), TurningLoss(5)
    kwargs = {"steps": 10, "step_size": 0.02, "seed": 5}
    last = PGD(loss=rec_last, keep_best=False, **kwargs)(trained_mlp, x, y, 0.1)
    best = PGD(loss=rec_best, **kwargs)(trained_mlp, x, y, 0.1)
    with torch.no_grad():
        fooled_last = trained_mlp(last).argmax(1) != y
        fooled_best = trained_mlp(best).argmax(1) != y
    ever = torch.stack(rec_best.fooled).any(0) | fooled_last
    assert all(torch.equal(a, b) for a, b in zip(rec_last.fooled, rec_best.fooled, strict=True))
    assert torch.equal(fooled_best, ever)  # every example fooled at any step stays fooled
    assert (ever & ~fooled_last).sum() >= 10  # the last iterate lost some: the test bites
    assert (best - x).abs().amax() <= 0.1 + 1e-6
    # an example fooled at the end keeps its last iterate
    both = fooled_last & fooled_best
    assert torch.equal(best[both], last[both])


def test_fgsm_many_strengths_equal_separate_runs(trained_mlp, batch):
    x, y = batch
    strengths = [0.0, 0.03, 0.1, 0.2, 0.3]
    together = fgsm(trained_mlp, x, y, strengths)
    assert isinstance(together, list) and len(together) == len(strengths)
    for eps, adv in zip(strengths, together, strict=True):
        assert torch.equal(adv, fgsm(trained_mlp, x, y, eps))


def test_fgsm_many_strengths_use_one_gradient(trained_mlp, batch, monkeypatch):
    import sys

    mod = sys.modules["advguard.attacks.fgsm"]

    calls = []
    real = mod.input_gradient
    monkeypatch.setattr(mod, "input_gradient", lambda *a: calls.append(1) or real(*a))
    fgsm(trained_mlp, *batch, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert len(calls) == 1


def test_fgsm_is_gradient_sign_step(trained_mlp, batch):
    x, y = batch
    x = x.clamp(0.2, 0.8)  # no clipping at 0.1 from here
    direction = gradient_sign(trained_mlp, x, y)
    assert set(direction.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(fgsm(trained_mlp, x, y, 0.1), x + 0.1 * direction)


def test_fgsm_directions_match_batches(trained_mlp, mnist_test):
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    d = fgsm_directions(trained_mlp, x, y, batch_size=128)
    assert d.dtype == torch.int8 and d.shape == x.shape
    assert torch.equal(perturb(x, d, 0.2), fgsm(trained_mlp, x, y, 0.2))


def test_attacks_lower_accuracy_and_pgd_is_stronger(trained_mlp, mnist_test):
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    clean = accuracy(trained_mlp, x, y)
    at_fgsm = accuracy(trained_mlp, fgsm(trained_mlp, x, y, 0.1), y)
    at_pgd = accuracy(trained_mlp, PGD(steps=10)(trained_mlp, x, y, 0.1), y)
    assert clean > 0.8
    assert at_fgsm < clean - 0.2
    assert at_pgd <= at_fgsm


def test_pgd_restarts_never_weaker(trained_mlp, mnist_test):
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    one = accuracy(trained_mlp, PGD(steps=3, restarts=1, seed=3)(trained_mlp, x, y, 0.08), y)
    three = accuracy(trained_mlp, PGD(steps=3, restarts=3, seed=3)(trained_mlp, x, y, 0.08), y)
    assert three <= one


@pytest.mark.parametrize("bad, message", [
    (lambda x: x * 255, "must lie in [0, 1]"),
    (lambda x: x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0,
        torch.tensor([0]), True), float("nan")), "NaN"),
    (lambda x: (x * 255).to(torch.uint8), "floating point"),
    (lambda x: x[:, 0], "shape (N, C, H, W)"),
    (lambda x: x.repeat(1, 3, 1, 1), "expects images of shape"),
])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_reject_bad_images(bad, message, attack, trained_mlp, batch):
    x, y = batch
    with pytest.raises(InputError, match=re.escape(message)):
        ATTACKS[attack](trained_mlp, bad(x), y, 0.1)


@pytest.mark.parametrize("eps", [-0.1, 1.5, [], [0.1, 2.0], "0.1"])
def test_attacks_reject_bad_strengths(eps, trained_mlp, batch):
    with pytest.raises(InputError):
        fgsm(trained_mlp, *batch, eps)


def test_attacks_reject_mismatched_labels(trained_mlp, batch):
    x, y = batch
    with pytest.raises(InputError, match="labels must have shape"):
        fgsm(trained_mlp, x, y[:10], 0.1)


# --- the registry: every attack by name, in every norm it has ---------------------------------

def _registered():
    from advguard.attacks.registry import ATTACKS
    return [(name, norm) for name, entry in ATTACKS.items() for norm in entry.classes]


@pytest.mark.parametrize(("name", "norm"), _registered())
def test_every_registered_attack_builds_in_its_norms_and_keeps_its_ball(name, norm, trained_mlp,
                                                                         batch):
    """Built by name in each norm it has, an evaluation attack's images lie in that norm's
    ε-ball and [0, 1] and fool the model more often than clean images; a training perturbation
    or a minimal attack builds and answers the interface."""
    from advguard.attacks import norm_named
    from advguard.attacks.registry import ATTACKS, EVALUATION, build_attack

    evaluation = EVALUATION in ATTACKS[name].roles
    eps = 1.5 if norm == "l2" and evaluation else 0.1
    attack = build_attack(name, norm, steps=5, step_size=2.5 * eps / 5, seed=0)
    x, y = batch[0][:16], batch[1][:16]
    adv = attack(trained_mlp, x, y, eps)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    if evaluation:
        assert getattr(attack, "norm", "linf") == norm
        assert (norm_named(norm).distance(adv, x) <= eps + 1e-4).all()
        with torch.no_grad():
            assert (trained_mlp(adv).argmax(1) != y).sum() > (trained_mlp(x).argmax(1) != y).sum()


def test_the_registry_refuses_what_it_does_not_have():
    from advguard.attacks.registry import build_attack

    with pytest.raises(InputError, match="unknown attack 'cw'"):
        build_attack("cw")
    with pytest.raises(InputError, match="rs-fgsm runs in linf only, not l2"):
        build_attack("rs-fgsm", "l2")
    with pytest.raises(InputError, match="unknown norm 'l1'"):
        build_attack("pgd", "l1")


def test_evaluate_threats_are_the_registry_s_and_fgsm_is_the_paper_s(trained_mlp, trained_lenet,
                                                                      batch):
    """``evaluate --attack`` takes white-box-NAME and transfer-NAME for every registered
    evaluation attack; the registry's ``fgsm`` curve is the paper's (FGSM directions, one
    gradient for every strength), white-box and transferred; in L2 it is FGM's."""
    from advguard.attacks import FGM
    from advguard.attacks.registry import EVALUATION, attack_names
    from advguard.evaluation.robustness import (
        Threat,
        curve_batch,
        curve_from_directions,
        strength_column,
        threat_names,
    )

    names = attack_names(EVALUATION)
    assert {"fgsm", "pgd", "apgd-ce"} <= set(names) and "rs-fgsm" not in names
    assert threat_names() == [f"white-box-{n}" for n in names] + [f"transfer-{n}" for n in names]
    assert Threat.parse("transfer-fgsm") == Threat("fgsm", transfer=True)
    with pytest.raises(InputError, match="unknown attack 'white-box-cw'"):
        Threat.parse("white-box-cw")
    x, y = batch
    grid = [0.0, 0.05, 0.1, 0.2]
    for crafter, threat in ((None, "white-box-fgsm"), (trained_lenet, "transfer-fgsm")):
        cols = curve_batch(trained_mlp, grid, threat, crafter=crafter)(x, y)
        ours = [float(cols[strength_column(e)].float().mean()) for e in grid]
        d = fgsm_directions(crafter or trained_mlp, x, y)
        assert ours == pytest.approx(curve_from_directions(trained_mlp, x, y, d, grid))
    l2 = [0.5, 1.0, 2.0]
    cols = curve_batch(trained_mlp, l2, "white-box-fgsm", norm="l2")(x, y)
    advs = FGM().craft_many(trained_mlp, x, y, l2)
    with torch.no_grad():
        want = [(trained_mlp(a).argmax(1) == y) for a in advs]
    assert all(torch.equal(cols[strength_column(e)], w) for e, w in zip(l2, want, strict=True))
