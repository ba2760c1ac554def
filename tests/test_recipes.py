"""White-box training recipes: random-start FGSM, PGD examples, sampled strengths, one-cycle
learning rate, and their resumability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advguard.attacks import PGD, NoiseFGSM, RandomStartFGSM, fgsm
from advguard.errors import AdvguardError
from advguard.models import accuracy, build_model
from advguard.reproduce import MatConfig
from advguard.training import (
    RECIPES,
    Recipe,
    RecipeName,
    Schedule,
    StrengthMix,
    TrainConfig,
    WhiteBox,
    get_recipe,
    train,
)


@pytest.fixture
def batch(mnist_train):
    return mnist_train.x[:64], mnist_train.y[:64]


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1)


def test_pgd_takes_one_strength_per_example(trained_mlp, batch):
    x, y = batch
    eps = torch.tensor([0.0, 0.1, 0.3, 0.2] * 16).view(-1, 1, 1, 1)
    adv = PGD(steps=5, seed=1).run(trained_mlp, x, y, eps)
    # each example reaches the edge of its own ball (signed steps of 2.5ε/5 saturate it), so a
    # strength taken for the batch (the first, the largest) would show here
    assert torch.allclose(linf(adv, x), eps.flatten(), atol=2e-3)


def test_pgd_restarts_never_lose_an_example_already_fooled(trained_mlp, batch):
    x, y = batch
    one = PGD(steps=3, restarts=1, seed=2).run(trained_mlp, x, y, 0.1)
    many = PGD(steps=3, restarts=4, seed=2).run(trained_mlp, x, y, 0.1)
    with torch.no_grad():
        fooled_one = trained_mlp(one).argmax(1) != y
        fooled_many = trained_mlp(many).argmax(1) != y
    assert torch.all(fooled_many[fooled_one])  # the first restart's successes are kept
    assert fooled_many.sum() >= fooled_one.sum()
    assert torch.all(linf(many, x) <= 0.1 + 1e-6)


def test_early_stopped_pgd_freezes_examples_once_they_are_misclassified(trained_mlp, batch):
    x, y = batch
    plain = PGD(steps=8, random_start=False).run(trained_mlp, x, y, 0.2)
    stopped = PGD(steps=8, random_start=False, early_stop=True).run(trained_mlp, x, y, 0.2)
    with torch.no_grad():
        wrong_clean = trained_mlp(x).argmax(1) != y
        fooled = trained_mlp(stopped).argmax(1) != y
    assert wrong_clean.any() and (~wrong_clean).any()
    assert torch.equal(stopped[wrong_clean], x[wrong_clean])  # never moved
    assert not torch.equal(plain[wrong_clean], x[wrong_clean])  # plain PGD moves them all
    # along the same (start-free) path, an example stops where it is first fooled, so it is
    # never further out than plain PGD's, and a fooled example stays fooled
    assert torch.all(linf(stopped, x) <= linf(plain, x) + 1e-6)
    assert fooled.sum() >= wrong_clean.sum()
    assert RECIPES[RecipeName.PGD_AT].attack.early_stop  # the PGD-AT baseline trains with it


def test_random_start_fgsm_stays_in_the_ball_and_is_not_plain_fgsm(trained_mlp, batch):
    x, y = batch
    eps = torch.full((len(x),), 0.2)
    torch.manual_seed(0)
    adv = RandomStartFGSM().craft(trained_mlp, x, y, eps)
    assert torch.all(linf(adv, x) <= 0.2 + 1e-6)
    assert not torch.allclose(adv, fgsm(trained_mlp, x, y, 0.2))
    # the step (1.25·ε) from a point inside the ball reaches the boundary for most pixels
    moved = ((adv - x).abs() > 0.19).float().mean()
    assert moved > 0.3
    torch.manual_seed(0)
    assert torch.equal(adv, RandomStartFGSM().craft(trained_mlp, x, y, eps))


def test_pgd_examples_are_stronger_than_random_start_fgsm(trained_mlp, batch):
    x, y = batch
    eps = torch.full((len(x),), 0.15)
    torch.manual_seed(0)
    one_step = RandomStartFGSM().craft(trained_mlp, x, y, eps)
    many = PGD(steps=10, seed=None).craft(trained_mlp, x, y, eps)
    assert accuracy(trained_mlp, many, y) <= accuracy(trained_mlp, one_step, y)


def test_sampled_mix_draws_one_strength_per_example(trained_mlp, batch):
    x, y = batch
    index = torch.arange(len(x))
    mix = StrengthMix((0.1, 0.3), sample=True)
    xb, yb = mix.batch(trained_mlp, x, y, index, WhiteBox())
    assert xb.shape[0] == 2 * len(x) and torch.equal(yb, y.repeat(2))
    assert torch.equal(xb[:len(x)], x)  # the clean copy
    dist = linf(xb[len(x):], x)
    low, high = torch.isclose(dist, torch.tensor(0.1)), torch.isclose(dist, torch.tensor(0.3))
    assert torch.all(low | high) and low.any() and high.any()

    adv_only = StrengthMix((0.1, 0.3), sample=True, clean=False)
    xa, ya = adv_only.batch(trained_mlp, x, y, index, WhiteBox(RandomStartFGSM()))
    assert xa.shape[0] == len(x) and torch.all(linf(xa, x) > 0)


def test_full_mix_with_an_example_source_attacks_at_every_strength(trained_mlp, batch):
    x, y = batch
    xb, _ = StrengthMix((0.1, 0.2), clean=False).batch(
        trained_mlp, x, y, torch.arange(len(x)), WhiteBox(PGD(steps=2, seed=None)))
    assert xb.shape[0] == 2 * len(x)
    assert torch.all(linf(xb[:len(x)], x) <= 0.1 + 1e-6)
    assert linf(xb[len(x):], x).max() > 0.1


def test_invalid_mixes_are_refused():
    with pytest.raises(ValueError, match="reduced or sampled"):
        StrengthMix((0.1,), reduced=True, sample=True)
    with pytest.raises(ValueError, match="clean=False"):
        StrengthMix((), clean=False)
    with pytest.raises(ValueError, match="cosine"):
        TrainConfig(schedule="cosine")  # type: ignore[arg-type]


def _tiny():
    from advguard.data import load_dataset

    return load_dataset("mnist", limit=200)


@pytest.mark.parametrize("extra", [{}, {"ramp": 0.6, "average": 0.9}])
def test_one_cycle_schedule_and_random_draws_resume_exactly(mnist_train, tmp_path,
                                                            monkeypatch, extra):
    data = mnist_train.subset(slice(0, 400))
    recipe = get_recipe("fgsm-rs")
    mix = recipe.mix([0.1, 0.3])
    config = TrainConfig(epochs=2, batch_size=50, seed=3, schedule="one-cycle", lr=5e-3,
                         **extra)

    torch.manual_seed(0)
    straight = build_model("small-cnn", "mnist")
    train(straight, data, mix, WhiteBox(recipe.attack), config, progress=False)

    torch.manual_seed(0)
    first = build_model("small-cnn", "mnist")
    state = tmp_path / "rs.state.pt"
    # interrupted (Ctrl-C) right after epoch 1's checkpoint of the same 2-epoch schedule
    import advguard.training.loop as loop

    real_save = loop.save_state

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(first, data, mix, WhiteBox(recipe.attack), config, state_path=state, progress=False)
    monkeypatch.setattr(loop, "save_state", real_save)
    torch.manual_seed(123)  # whatever the caller's generator holds, the state restores it
    resumed = build_model("small-cnn", "mnist")
    train(resumed, data, mix, WhiteBox(recipe.attack), config, state_path=state, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_recipes_describe_their_mixing():
    assert set(RECIPES) == {"fgsm", "fgsm-rs", "n-fgsm", "pgd-3", "pgd-at", "trades", "mart"}
    trades = get_recipe("trades")
    assert trades.mix([0.2, 0.3]).sample and not trades.mix([0.2, 0.3]).clean
    assert trades.config().trades_beta == 6.0 and trades.config(trades_beta=1.0).trades_beta == 1
    mart = get_recipe("mart")
    assert mart.config().mart_beta == 6.0 and mart.config().trades_beta == 0
    assert mart.mix([0.2, 0.3]).sample and not mart.mix([0.2, 0.3]).clean
    paper = get_recipe("fgsm").mix([0.1, 0.2])
    assert paper.clean and not paper.sample
    fast = get_recipe("fgsm-rs").mix([0.1, 0.2])
    assert fast.sample and not fast.clean
    assert get_recipe("fgsm-rs").mix([0.3]) == StrengthMix((0.3,), clean=False)
    assert get_recipe("fgsm").mix([0.1, 0.2], reduced=True).reduced
    with pytest.raises(AdvguardError, match="unknown recipe 'madry'"):
        get_recipe("madry")


def test_settings_pick_their_recipe_and_matrix_attack():
    wb = MatConfig(setting="white-box").resolve()
    assert wb.recipe == "fgsm-rs" and wb.matrix_attack == "pgd" and wb.matrix_val_limit == 1000
    tr = MatConfig().resolve()
    assert tr.recipe == "fgsm" and tr.matrix_attack == "fgsm" and tr.matrix_val_limit is None
    for bad in ({"recipe": "fgsm-rs"}, {"matrix_attack": "pgd"}, {"pgd_at": True}):
        with pytest.raises(AdvguardError, match="transfer setting"):
            MatConfig(**bad).resolve()  # type: ignore[arg-type]
    with pytest.raises(AdvguardError, match="matrix attack"):
        MatConfig(setting="white-box", matrix_attack="cw").resolve()


def test_n_fgsm_goes_past_the_ball_by_design_and_stays_an_image(trained_mlp, batch):
    x, y = batch
    attack = NoiseFGSM()
    assert attack.reach == 3.0
    torch.manual_seed(0)
    adv = attack.craft(trained_mlp, x, y, 0.1)
    dist = linf(adv, x)
    assert dist.max() > 0.1 + 1e-3 and dist.max() <= 0.3 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    torch.manual_seed(0)
    no_noise = NoiseFGSM(noise=0.0).craft(trained_mlp, x, y, 0.1)
    assert torch.allclose(no_noise, fgsm(trained_mlp, x, y, 0.1))  # k = 0, α = 1: plain FGSM
    with pytest.raises(AdvguardError, match="noise"):
        NoiseFGSM(noise=-1.0)


class CountingModel(torch.nn.Module):
    """Counts the examples that go through a forward pass with gradients on (``seen``) and
    without (``checked``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen, self.checked = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen += len(x)
        else:
            self.checked += len(x)
        return self.model(x)


@pytest.mark.parametrize("recipe, strengths", [
    (get_recipe("fgsm"), (0.1, 0.2)),  # one shared gradient + clean and two copies
    (get_recipe("fgsm-rs"), (0.1, 0.3)),  # one gradient + one sampled copy
    (get_recipe("n-fgsm"), (0.3,)),
    (get_recipe("trades"), (0.2, 0.3)),  # 10 KL steps + the adversarial and the clean pass
    (Recipe(RecipeName.PGD_AT, "PGD-3", PGD(steps=3, seed=None, early_stop=True), clean=False,
            sample=True, schedule=Schedule.ONE_CYCLE, lr=5e-3, batch_size=50), (0.3,)),
    (get_recipe("pgd-3"), (0.2, 0.3, 0.4)),  # 3 steps + the check after the (one) start
    (get_recipe("mart"), (0.2, 0.3)),  # PGD-10 + the adversarial and the clean pass
])
def test_recipe_passes_are_the_passes_training_makes(mnist_train, recipe, strengths):
    data = mnist_train.subset(slice(0, 200))
    torch.manual_seed(0)
    net = CountingModel(build_model("small-cnn", "mnist"))
    train(net, data, recipe.mix(strengths), WhiteBox(recipe.attack),
          recipe.config(epochs=2, batch_size=50), progress=False)
    assert net.seen == recipe.passes(strengths, 2) * len(data)
    # the forward passes without a gradient: PGD's success checks, TRADES' clean reference —
    # and one image before training, the check that the model takes the data's images
    assert net.checked == recipe.checks(strengths, 2) * len(data) + 1


@pytest.mark.parametrize("recipe, strengths", [
    (get_recipe("fgsm"), ()),  # clean training: + the near-copy (the batch is the clean image)
    (get_recipe("fgsm"), (0.1, 0.2)),  # + the near-copy: the batch keeps the clean copy
    (get_recipe("fgsm-rs"), (0.2,)),  # + the clean image again and the near-copy
    (get_recipe("fgsm-rs"), (0.1, 0.3)),
    (get_recipe("trades"), (0.2, 0.3)),  # the near-copy only: TRADES holds the clean output
    (get_recipe("mart"), (0.2,)),
])
def test_recipe_passes_count_stability_training(mnist_train, recipe, strengths):
    data = mnist_train.subset(slice(0, 100))
    torch.manual_seed(0)
    net = CountingModel(build_model("small-cnn", "mnist"))
    train(net, data, recipe.mix(strengths), WhiteBox(recipe.attack),
          recipe.config(epochs=1, batch_size=50, stability=1.0), progress=False)
    assert net.seen == recipe.passes(strengths, 1, stability=True) * len(data)
    assert recipe.passes(strengths, 1, stability=True) > recipe.passes(strengths, 1)


def test_trades_inner_maximisation_raises_the_kl_and_stays_in_the_ball(trained_mlp, batch):
    from advguard.attacks import TradesKL, trades_kl

    x, y = batch
    torch.manual_seed(0)
    adv = TradesKL(steps=10).craft(trained_mlp, x, y, 0.1)
    assert linf(adv, x).max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean = trained_mlp(x)
        start = trained_mlp((x + 0.001 * torch.randn_like(x)).clamp(0, 1))
        assert trades_kl(trained_mlp(adv), clean) > 50 * max(float(trades_kl(start, clean)),
                                                             1e-6)


def test_the_trades_loss_needs_one_adversarial_copy_per_image(mnist_train):
    data = mnist_train.subset(slice(0, 100))
    with pytest.raises(AdvguardError, match="TRADES loss pairs each image"):
        train(build_model("mlp3", "mnist"), data, StrengthMix((0.1, 0.2)), None,
              TrainConfig(epochs=1, trades_beta=6.0), progress=False)
    # without strengths there is nothing adversarial: clean training, as every recipe
    done = train(build_model("mlp3", "mnist"), data, StrengthMix(), None,
                 TrainConfig(epochs=1, trades_beta=6.0), progress=False)
    assert done.history[0]["loss"] > 0


def one_paired_step(data, config: TrainConfig, attack):
    """``(loss the loop reports, model before the step in train mode, x, y, adversarial x)``
    for one step over 50 images at strength 0.2, the batch and copies rebuilt by hand."""
    torch.manual_seed(0)
    model = build_model("mlp3", "mnist")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, StrengthMix((0.2,), clean=False), WhiteBox(attack), config,
                   progress=False)
    ref = build_model("mlp3", "mnist")
    ref.load_state_dict(before)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(config.seed))
    x, y = data.x[order], data.y[order]
    torch.manual_seed(config.seed)
    adv = attack.craft(ref, x, y, torch.full((50,), 0.2))
    ref.train()
    return result.history[0]["loss"], ref, x, y, adv


def test_trades_training_is_what_its_loss_says(mnist_train):
    """One step of the loop equals CE(clean) + β·KL/N computed by hand on the same batch."""
    from advguard.attacks import TradesKL, trades_kl

    config = TrainConfig(epochs=1, batch_size=50, trades_beta=3.0, lr=1e-3)
    loss, ref, x, y, adv = one_paired_step(mnist_train.subset(slice(0, 50)), config,
                                           TradesKL(steps=2))
    clean = ref(x)
    expected = torch.nn.functional.cross_entropy(clean, y) + 3.0 * trades_kl(ref(adv), clean) / 50
    assert abs(loss - float(expected.detach())) < 1e-4


def test_strength_ramp_rises_from_zero_and_holds(mnist_train):
    config = TrainConfig(ramp=0.5)
    scales = [config.strength_scale(i, 100) for i in range(100)]
    assert scales[0] == pytest.approx(0.02) and scales[49] == 1.0 and scales[-1] == 1.0
    assert scales == sorted(scales)
    assert TrainConfig().strength_scale(0, 100) == 1.0
    for bad in ({"ramp": 1.0}, {"average": -0.1}, {"average": float("nan")}):
        with pytest.raises(AdvguardError, match="must be in"):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_ramped_training_starts_weak_and_weight_averaging_changes_the_model(mnist_train):
    data = mnist_train.subset(slice(0, 300))
    recipe = get_recipe("fgsm-rs")
    seen: list[float] = []

    class Spy(WhiteBox):
        def copies(self, model, x, y, index, strengths, augment=None):
            seen.append(float(strengths[0].max()))
            return super().copies(model, x, y, index, strengths, augment)

    models = {}
    for name, extra in {"plain": {}, "ramp": {"ramp": 0.5}, "avg": {"average": 0.9}}.items():
        seen.clear()
        torch.manual_seed(0)
        models[name] = build_model("small-cnn", "mnist")
        train(models[name], data, recipe.mix([0.3]), Spy(recipe.attack),
              recipe.config(epochs=2, batch_size=50, **extra), progress=False)
        if name == "ramp":
            assert seen[0] == pytest.approx(0.3 / 6) and seen[-1] == pytest.approx(0.3)
            assert seen == sorted(seen)
        else:
            assert seen == pytest.approx([0.3] * len(seen))
    a, b = models["plain"].state_dict(), models["avg"].state_dict()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_mart_loss_is_its_formula():
    """Wang et al.'s loss, example by example in float64: BCE(p′, y) = −log p′_y −
    log(1 − max_{k≠y} p′_k), plus β · KL(p ‖ p′) · (1 − p_y), averaged."""
    from advguard.training.losses import mart_loss

    gen = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen) * 3
    y = torch.randint(0, 10, (8,), generator=gen)
    total = 0.0
    for c, a, t in zip(clean.double().softmax(1), adv.double().softmax(1), y.tolist(),
                       strict=True):
        wrong = max(float(a[k]) for k in range(10) if k != t)
        bce = -np.log(float(a[t])) - np.log(1 - wrong)
        kl = float((c * (c.log() - a.log())).sum())
        total += bce + 6.0 * kl * (1 - float(c[t]))
    assert float(mart_loss(clean, adv, y, 6.0)) == pytest.approx(total / 8, rel=1e-5)
    # a clean image the model already gets right, with certainty, adds no KL term
    sure = torch.full((1, 10), -30.0)
    sure[0, 3] = 30.0
    assert float(mart_loss(sure, adv[:1], torch.tensor([3]), 6.0)) == pytest.approx(
        float(mart_loss(sure, adv[:1], torch.tensor([3]), 0.0)), abs=1e-6)


def test_mart_training_is_what_its_loss_says(mnist_train):
    """One step of the loop equals the MART loss of the same batch and adversarial copies."""
    from advguard.training.losses import mart_loss

    config = TrainConfig(epochs=1, batch_size=50, mart_beta=5.0, lr=1e-3)
    loss, ref, x, y, adv = one_paired_step(mnist_train.subset(slice(0, 50)), config,
                                           PGD(steps=2, seed=None, keep_best=False))
    expected = mart_loss(ref(x), ref(adv), y, 5.0)
    assert abs(loss - float(expected.detach())) < 1e-4
    with pytest.raises(AdvguardError, match="one loss"):
        TrainConfig(trades_beta=6.0, mart_beta=6.0)
    with pytest.raises(AdvguardError, match="no label smoothing"):
        TrainConfig(mart_beta=6.0, label_smoothing=0.1)
