from __future__ import annotations

import pytest
import torch

from advguard.attacks import fgsm, perturb
from advguard.errors import CheckpointError
from advguard.models import accuracy, build_model
from advguard.training import (
    StrengthMix,
    TrainConfig,
    Transfer,
    WhiteBox,
    train,
)


@pytest.fixture
def batch(mnist_train):
    index = torch.arange(10, 42)
    return mnist_train.x[index], mnist_train.y[index], index


@pytest.mark.parametrize("strengths", [(), (0.1,), (0.1, 0.2, 0.3)])
def test_full_size_mix_is_clean_plus_one_copy_per_strength(strengths, batch, trained_mlp):
    x, y, index = batch
    xb, yb = StrengthMix(strengths).batch(trained_mlp, x, y, index, WhiteBox())
    assert xb.shape[0] == (len(strengths) + 1) * len(x)
    assert torch.equal(xb[: len(x)], x) and torch.equal(yb, y.repeat(len(strengths) + 1))
    for s, eps in enumerate(strengths, start=1):
        copy = xb[s * len(x):(s + 1) * len(x)]
        assert torch.equal(copy, fgsm(trained_mlp, x, y, eps))


def test_reduced_size_mix_keeps_n_and_assigns_balanced_groups(batch, trained_mlp):
    x, y, index = batch
    mix = StrengthMix((0.1, 0.2, 0.3), reduced=True)
    groups = mix.groups(4000, seed=0)
    assert torch.bincount(groups).tolist() == [1000] * 4
    assert torch.equal(groups, mix.groups(4000, seed=0))
    xb, yb = mix.batch(trained_mlp, x, y, index, WhiteBox(), groups)
    assert xb.shape == x.shape and torch.equal(yb, y)
    levels = torch.tensor([0.0, 0.1, 0.2, 0.3])
    for i in range(len(x)):
        eps = float(levels[groups[index[i]]])
        want = x[i] if eps == 0 else fgsm(trained_mlp, x[i:i + 1], y[i:i + 1], eps)[0]
        assert torch.allclose(xb[i], want, atol=1e-6)


def test_transfer_directions_come_from_the_fixed_dataset(batch, trained_mlp, mnist_train):
    x, y, index = batch
    directions = torch.randint(-1, 2, mnist_train.x.shape, dtype=torch.int8,
                               generator=torch.Generator().manual_seed(0))
    xb, _ = StrengthMix((0.2,)).batch(trained_mlp, x, y, index, Transfer(directions))
    assert torch.equal(xb[len(x):], perturb(x, directions[index], 0.2))


def test_training_learns_real_mnist(mnist_train, mnist_test, trained_mlp):
    assert accuracy(trained_mlp, mnist_test.x, mnist_test.y) > 0.85


def interrupt_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``train`` stop (as Ctrl-C would) right after it saved its first epoch's state."""
    import advguard.training.loop as loop

    save_state = loop.save_state

    def save_then_stop(path, state):
        save_state(path, state)
        monkeypatch.setattr(loop, "save_state", save_state)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_stop)


def test_resumed_training_equals_uninterrupted(mnist_train, tmp_path, monkeypatch):
    data = mnist_train.subset(slice(0, 600))
    config = TrainConfig(epochs=2, batch_size=50, seed=5)
    mix = StrengthMix((0.1, 0.2))

    torch.manual_seed(0)
    straight = build_model("mlp3", "mnist")
    train(straight, data, mix, None, config, progress=False)

    torch.manual_seed(0)
    first = build_model("mlp3", "mnist")
    state = tmp_path / "run.state.pt"
    interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(first, data, mix, None, config, state_path=state, progress=False)
    resumed = build_model("mlp3", "mnist")  # fresh weights: everything comes from the state
    result = train(resumed, data, mix, None, config, state_path=state, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_corrupt_training_state_is_reported(mnist_train, tmp_path):
    state = tmp_path / "bad.state.pt"
    state.write_bytes(b"PK\x03\x04 not a real zip")
    with pytest.raises(CheckpointError, match="corrupt or truncated training state"):
        train(build_model("mlp3", "mnist"), mnist_train.subset(slice(0, 50)),
              state_path=state, progress=False)


def test_white_box_adversarial_training_buys_fgsm_robustness(mnist_train, mnist_test):
    data = mnist_train.subset(slice(0, 2000))
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    robust = {}
    for strengths in [(), (0.1, 0.2)]:
        torch.manual_seed(0)
        model = build_model("mlp3", "mnist")
        train(model, data, StrengthMix(strengths), None, TrainConfig(epochs=3, batch_size=64),
              progress=False)
        robust[strengths] = accuracy(model, fgsm(model, x, y, 0.1), y)
    assert robust[(0.1, 0.2)] > robust[()] + 0.2


def test_flip_crop_shifts_and_mirrors_each_example_and_commutes_with_perturbation():
    from advguard.attacks import perturb
    from advguard.data import FlipCrop

    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    aug = FlipCrop.draw(x, flip=True, pad=1)
    out = aug(x)
    assert out.shape == x.shape
    for i in range(6):  # each example is a window of its reflect-padded image, maybe mirrored
        padded = torch.nn.functional.pad(x[i:i + 1], (1, 1, 1, 1), mode="reflect")[0]
        dy, dx = int(aug.dy[i]), int(aug.dx[i])
        window = padded[:, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], window.flip(2) if aug.mirror[i] else window)
    assert 0 < int(aug.mirror.sum()) < 6
    assert not FlipCrop.draw(x, flip=False).mirror.any()  # digits are never mirrored
    # the transfer setting's directions get the same draw: the copy of the augmented image
    # is the augmented copy
    d = torch.randint(-1, 2, x.shape).float()
    assert torch.allclose(perturb(aug(x), aug(d), 0.1), aug(perturb(x, d, 0.1)))


def test_augmented_transfer_training_runs_and_resumes_its_draws(mnist_train, trained_mlp,
                                                                tmp_path):
    from advguard.attacks import fgsm_directions
    from advguard.training import Transfer

    data = mnist_train.subset(slice(0, 200))
    source = Transfer(fgsm_directions(trained_mlp, data.x, data.y))
    config = TrainConfig(epochs=1, batch_size=50, augment=True, label_smoothing=0.1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model("mlp3", "mnist")
        train(net, data, StrengthMix((0.1,)), source, config, progress=False)
        runs.append(net.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # seeded draws
    torch.manual_seed(0)
    plain = build_model("mlp3", "mnist")
    train(plain, data, StrengthMix((0.1,)), source, TrainConfig(epochs=1, batch_size=50),
          progress=False)
    assert any(not torch.equal(runs[0][k], plain.state_dict()[k]) for k in runs[0])


def test_channels_last_trains_the_same_model_and_returns_it_contiguous(mnist_train):
    data = mnist_train.subset(slice(0, 200))
    nets = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = build_model("small-cnn", "mnist")
        train(net, data, StrengthMix((0.1,)), None,
              TrainConfig(epochs=1, batch_size=50, channels_last=channels_last), progress=False)
        nets.append(net)
    conv = nets[1][1].weight
    assert conv.is_contiguous()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_l2_recipes_craft_their_copies_in_the_l2_ball(batch, trained_mlp):
    """``--norm l2``: the fgsm recipe's copies are FGM's (one gradient, unit L2 direction) at
    each radius, the PGD recipes' stay in the L2 ball; a recipe with no L2 form is refused."""
    from advguard.attacks import FGM, L2, PGD
    from advguard.errors import InputError
    from advguard.training import TrainJob, get_recipe

    x, y, index = batch
    fgsm_l2 = get_recipe("fgsm").in_norm("l2")
    assert isinstance(fgsm_l2.attack, FGM) and fgsm_l2.norm == "l2"
    radii = (1.0, 2.5)  # beyond any L∞ strength: L2 radii
    xb, _ = fgsm_l2.mix(radii).batch(trained_mlp, x, y, index, WhiteBox(fgsm_l2.attack))
    for s, eps in enumerate(radii, start=1):
        copy = xb[s * len(x):(s + 1) * len(x)]
        assert torch.equal(copy, FGM(norm="l2").craft(trained_mlp, x, y, eps))
        d = L2.distance(copy, x)
        assert (d <= eps + 1e-4).all() and d.mean() > 0.8 * eps  # clipping to [0, 1] shortens
    pgd_l2 = get_recipe("pgd-at").in_norm("l2")
    assert isinstance(pgd_l2.attack, PGD) and pgd_l2.attack.norm == "l2"
    xb, _ = pgd_l2.mix((2.0,)).batch(trained_mlp, x, y, index, WhiteBox(pgd_l2.attack))
    assert (L2.distance(xb, x) <= 2.0 + 1e-4).all()
    with pytest.raises(InputError, match="fgsm-rs recipe crafts with RandomStartFGSM"):
        get_recipe("fgsm-rs").in_norm("l2")
    with pytest.raises(InputError, match="fgsm-rs recipe crafts with RandomStartFGSM"):
        TrainJob(strengths=(1.0,), norm="l2", recipe="fgsm-rs")
    with pytest.raises(InputError, match=r"strength eps=2\.0 must be a number in \[0, 1\]"):
        TrainJob(strengths=(2.0,))  # L∞ strengths stay in [0, 1]


def test_train_norm_l2_end_to_end(tmp_path, cli):
    """``advguard train --norm l2`` trains on FGM copies at L2 radii and says so in the file."""
    from advguard.io import read_metadata

    out = tmp_path / "l2.safetensors"
    proc = cli("train", str(out), "--model", "mlp3", "--dataset", "mnist", "--norm", "l2",
               "--strengths", "1,2", "--epochs", "1", "--train-limit", "600", "--quiet")
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(out)
    assert meta["norm"] == "l2" and meta["strengths"] == [1.0, 2.0]
    proc = cli("train", str(tmp_path / "x.safetensors"), "--model", "mlp3", "--dataset",
               "mnist", "--strengths", "2", "--epochs", "1", "--train-limit", "600", "--quiet")
    assert proc.returncode != 0 and "must be a number in [0, 1]" in proc.stderr


def test_stale_batchnorm_averages_are_re_estimated_over_the_training_images(mnist_train):
    """A BatchNorm layer with momentum 0.01 after 4 updates still holds 96% of its starting
    averages (mean 0, variance 1): at the end of training they are re-estimated over the
    training images, so its running mean is the mean of its inputs over those images."""
    from torch import nn

    from advguard.training import TrainConfig, train

    data = mnist_train.subset(slice(0, 256))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, momentum=0.01), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    result = train(net, data, config=TrainConfig(epochs=1, batch_size=64, device="cpu"),
                   progress=False)
    assert result.refreshed_batchnorm == ["1"]
    with torch.no_grad():
        inputs = net[0](data.x)  # what the layer normalises, with the trained weights
    want = inputs.mean(dim=(0, 2, 3))
    assert torch.allclose(net[1].running_mean, want, atol=1e-5)
    assert not torch.allclose(net[1].running_mean, 0.96 * torch.zeros(8) + 0.04 * want,
                              atol=1e-3)  # not the moving average training left


def test_only_averages_that_still_hold_their_start_are_stale():
    from torch import nn

    from advguard.training.batchnorm import stale_batchnorm

    def layer(momentum: float | None, updates: int) -> nn.Module:
        bn = nn.BatchNorm1d(4, momentum=momentum)
        bn.num_batches_tracked.fill_(updates)
        return nn.Sequential(bn)

    assert stale_batchnorm(layer(0.1, 40)) == ["0"]  # 0.9^40 = 1.5% of the start left
    assert stale_batchnorm(layer(0.1, 50)) == []  # 0.5%
    assert stale_batchnorm(layer(0.01, 362)) == ["0"]  # MobileNetV3's, 360 steps: 2.6%
    assert stale_batchnorm(layer(0.01, 500)) == []
    assert stale_batchnorm(layer(None, 1)) == []  # an equal average of every batch seen
    assert stale_batchnorm(layer(None, 300)) == []
    assert stale_batchnorm(layer(None, 0)) == ["0"]
    assert stale_batchnorm(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False))) == []


def test_a_weight_average_does_not_make_fresh_batchnorm_look_stale(mnist_train):
    """With a weight average the saved model's update counts are averaged (and truncated):
    staleness is judged on the trained model's own, 64 updates at momentum 0.1 (0.1% of the
    start left), so nothing is re-estimated."""
    from torch import nn

    from advguard.training import TrainConfig, train

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    result = train(net, mnist_train.subset(slice(0, 256)),
                   config=TrainConfig(epochs=1, batch_size=4, average=0.999, device="cpu"),
                   progress=False)
    assert int(net[1].num_batches_tracked) < 64  # the average's count, as saved
    assert result.refreshed_batchnorm == []


def test_near_copy_moves_each_image_with_a_black_or_mirrored_edge_and_adds_noise():
    from advguard.data import near_copy

    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    moved = near_copy(x, most=2, sigma=0.0)
    fills = set()
    for i in range(16):  # each copy is a window of its image padded black or mirrored
        windows = {(fill, dy, dx): torch.nn.functional.pad(
            x[i:i + 1], (2, 2, 2, 2), **({"mode": "reflect"} if fill == "mirrored" else {})
        )[0, :, dy:dy + 8, dx:dx + 8] for fill in ("black", "mirrored")
            for dy in range(5) for dx in range(5)}
        match = [k for k, w in windows.items() if torch.equal(moved[i], w)]
        assert match, f"copy {i} is no move of its image by up to 2 pixels"
        fills.update(k[0] for k in match if (k[1], k[2]) != (2, 2))
    assert fills == {"black", "mirrored"}
    noisy = near_copy(x, most=0, sigma=0.05)
    assert 0 <= float(noisy.min()) and float(noisy.max()) <= 1
    assert 0.03 < float((noisy - x).std()) < 0.06


def test_stability_training_holds_the_class_over_near_copies(mnist_train, mnist_test):
    from advguard.data import near_copy

    data = mnist_train.subset(slice(0, 2000))
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    torch.manual_seed(1)
    copies = [near_copy(x, most=2, sigma=0.1) for _ in range(4)]
    flips, right = {}, {}
    for stability in (0.0, 4.0):
        torch.manual_seed(0)
        model = build_model("mlp3", "mnist")
        train(model, data, StrengthMix(()), None,
              TrainConfig(epochs=3, batch_size=64, stability=stability, stability_noise=0.1),
              progress=False)
        with torch.no_grad():
            own = model(x).argmax(1)
            flips[stability] = sum(float((model(c).argmax(1) != own).float().mean())
                                   for c in copies) / len(copies)
        right[stability] = accuracy(model, x, y)
    # an MLP has no shift invariance of its own: its class moves with the digit, unless
    # trained to hold it
    assert flips[4.0] < 0.6 * flips[0.0], flips
    assert right[4.0] > 0.8, right  # still a digit classifier (0.93 without)


@pytest.mark.parametrize("mix", [
    StrengthMix(()),
    StrengthMix((0.1, 0.2)),
    StrengthMix((0.1, 0.2), sample=True),
    StrengthMix((0.1, 0.2), sample=True, clean=False),
    StrengthMix((0.1, 0.2, 0.3), reduced=True),
])
@pytest.mark.parametrize("source", ["white-box", "transfer"])
def test_clean_first_says_whether_the_mixed_batch_begins_with_the_clean_batch(
        mix, source, batch, trained_mlp, mnist_train):
    """The stability loss reuses the first rows of the mixed batch as the clean images'
    outputs where ``clean_first`` says so: it must be exactly where they are."""
    from advguard.attacks import fgsm_directions

    x, y, index = batch
    crafter = (WhiteBox() if source == "white-box" else
               Transfer(fgsm_directions(trained_mlp, mnist_train.x[:64], mnist_train.y[:64])))
    groups = mix.groups(64, seed=0)
    xb, _ = mix.batch(trained_mlp, x, y, index, crafter, groups)
    begins = len(xb) >= len(x) and torch.equal(xb[:len(x)], x)
    assert mix.clean_first == begins


def test_stability_loss_reuses_the_clean_outputs_of_a_batch_that_begins_with_them(mnist_train):
    from advguard.data import near_copy
    from advguard.training.losses import batch_loss

    torch.manual_seed(0)
    model = build_model("mlp3", "mnist")  # no BatchNorm: a batch's outputs are its rows'
    x, y = mnist_train.x[:32], mnist_train.y[:32]
    adv = fgsm(model, x, y, 0.1)
    xb, yb = torch.cat([x, adv]), y.repeat(2)  # the paper's FGSM batch: clean copy first
    near = near_copy(x, most=2, sigma=0.02)
    with torch.no_grad():
        apart = batch_loss(model, x, y, xb, yb, near=near, stability=4.0)
        shared = batch_loss(model, x, y, xb, yb, near=near, stability=4.0, clean_first=True)
        assert torch.allclose(apart, shared, atol=1e-6)
        # and the KL is there: the loss without it is smaller
        assert float(batch_loss(model, x, y, xb, yb)) < float(shared)


@pytest.mark.parametrize("field, value", [("stability", -1.0), ("stability_noise", float("nan")),
                                          ("stability_move", -1)])
def test_stability_options_are_checked(field, value):
    from advguard.errors import InputError

    with pytest.raises(InputError, match=field):
        TrainConfig(**{field: value})
