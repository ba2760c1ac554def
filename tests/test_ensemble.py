from __future__ import annotations

import pytest
import torch

from advguard.attacks import fgsm
from advguard.ensemble import (
    VotingEnsemble,
    fit_voting,
    load_ensemble,
    save_ensemble,
    train_parallel,
)
from advguard.errors import CheckpointError
from advguard.models import build_model
from advguard.training import TrainConfig


def _members(n=3):
    torch.manual_seed(0)
    return [build_model("mlp3", "mnist").eval() for _ in range(n)]


def test_mean_vote_is_the_mean_of_member_probabilities():
    members = _members()
    ensemble = VotingEnsemble(members).eval()
    x = torch.rand(5, 1, 28, 28)
    want = torch.stack([m(x).softmax(1) for m in members]).mean(0)
    assert torch.allclose(ensemble(x).exp(), want, atol=1e-6)
    assert torch.allclose(ensemble(x).exp().sum(1), torch.ones(5), atol=1e-5)


def test_white_box_gradient_goes_through_every_member():
    members = _members()
    ensemble = VotingEnsemble(members)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    torch.nn.functional.cross_entropy(ensemble(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for m in members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    y = torch.tensor([0, 1, 2, 3])
    assert not torch.equal(fgsm(ensemble, x.detach(), y, 0.1), fgsm(members[0], x.detach(), y, 0.1))


def test_ensemble_checkpoint_round_trip(tmp_path):
    ensemble = VotingEnsemble(_members(2)).eval()
    path = save_ensemble(tmp_path / "e.safetensors", ensemble, arch="mlp3", dataset="mnist",
                         strengths=[0.1, 0.2])
    loaded, meta = load_ensemble(path)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(ensemble(x), loaded(x)) and meta["strengths"] == [0.1, 0.2]
    from advguard.models import save_model

    save_model(tmp_path / "single.safetensors", _members(1)[0], arch="mlp3", dataset="mnist")
    with pytest.raises(CheckpointError, match="not an advguard ensemble"):
        load_ensemble(tmp_path / "single.safetensors")


def test_unknown_voting_rule():
    with pytest.raises(ValueError, match="unknown voting rule"):
        VotingEnsemble(_members(1), rule="median")


class _Fixed(torch.nn.Module):
    """A member that always predicts ``cls`` (or, if ``cls`` is None, the true digit is
    unknown to it and it answers uniformly)."""

    def __init__(self, cls: int | None) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        if self.cls is not None:
            out[:, self.cls] = 10.0
        return out


def test_learned_weights_move_to_the_member_that_is_right():
    members = [_Fixed(3), _Fixed(None), _Fixed(5)]
    ensemble = VotingEnsemble(members, rule="learned", num_classes=10)
    x = torch.rand(200, 1, 28, 28)
    y = torch.full((200,), 3)
    losses = fit_voting(ensemble, x, y, epochs=40, lr=0.1)
    weights = ensemble.logits.softmax(0)
    assert losses[-1] < losses[0]
    assert weights[0] > 0.9 and weights[0] > weights[2]
    assert (ensemble(x).argmax(1) == 3).all()


def test_gated_weights_depend_on_the_input():
    # member 0 is right on bright images, member 1 on dark ones; only a gate can use both
    class Right(torch.nn.Module):
        def __init__(self, bright: bool) -> None:
            super().__init__()
            self.bright = bright

        def forward(self, x):
            is_bright = x.mean(dim=(1, 2, 3)) > 0.5
            label = torch.where(is_bright == self.bright, 1, 2)
            return torch.nn.functional.one_hot(label, 10).float() * 6

    x = torch.cat([torch.full((100, 1, 28, 28), 0.9), torch.full((100, 1, 28, 28), 0.1)])
    y = torch.full((200,), 1)
    learned = VotingEnsemble([Right(True), Right(False)], rule="learned", num_classes=10)
    gated = VotingEnsemble([Right(True), Right(False)], rule="gated", num_classes=10)
    fit_voting(learned, x, y, epochs=60, lr=0.05)
    fit_voting(gated, x, y, epochs=60, lr=0.05)
    gated_acc = (gated(x).argmax(1) == y).float().mean()
    assert gated_acc == 1.0
    assert torch.nn.functional.nll_loss(gated(x), y) < torch.nn.functional.nll_loss(learned(x), y)


def test_mean_rule_has_nothing_to_fit():
    ensemble = VotingEnsemble(_members(2))
    assert fit_voting(ensemble, torch.rand(10, 1, 28, 28), torch.zeros(10, dtype=torch.long)) == []


@pytest.mark.parametrize("rule", ["learned", "gated"])
def test_fitted_voting_units_round_trip(rule, tmp_path):
    ensemble = VotingEnsemble(_members(2), rule=rule, num_classes=10)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    fit_voting(ensemble, x, y, epochs=3)
    path = save_ensemble(tmp_path / "e.safetensors", ensemble, arch="mlp3", dataset="mnist")
    loaded, meta = load_ensemble(path)
    assert meta["rule"] == rule and torch.allclose(ensemble(x), loaded(x), atol=1e-6)
    assert all(not p.grad for p in loaded.parameters())


def test_white_box_gradient_reaches_the_gate():
    ensemble = VotingEnsemble(_members(2), rule="gated", num_classes=10)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    torch.nn.functional.nll_loss(ensemble(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ensemble.gate is not None
    assert ensemble.gate[0].weight.grad is not None


def test_train_parallel_gives_one_member_per_strength(mnist_train, tmp_path):
    data = mnist_train.subset(slice(0, 300))
    ensemble, results = train_parallel(lambda: build_model("mlp3", "mnist"), data, [0.1, 0.3],
                                       config=TrainConfig(epochs=1, batch_size=100),
                                       state_dir=tmp_path, progress=False)
    assert len(ensemble.members) == 2 and len(results.members) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel-0.state.pt",
                                                          "parallel-1.state.pt"]
    a, b = (list(m.parameters())[0] for m in ensemble.members)
    assert not torch.equal(a, b)


def test_concurrent_members_equal_sequential_members(mnist_train):
    import functools

    data = mnist_train.subset(slice(0, 256))
    build = functools.partial(build_model, "mlp3", "mnist")
    config = TrainConfig(epochs=1, batch_size=64)
    seq, _ = train_parallel(build, data, [0.1, 0.2], config=config, progress=False)
    conc, res = train_parallel(build, data, [0.1, 0.2], config=config, progress=False, workers=2)
    assert len(res.peak_rss_mb) == 2 and all(r > 0 for r in res.peak_rss_mb)
    x = mnist_train.x[:32]
    assert torch.allclose(seq(x), conc(x), atol=1e-4)


def test_a_one_member_ensemble_is_attacked_like_its_member(trained_mlp, mnist_test):
    # a vote computed in probability space rounds 1 - p to 0 for confident inputs and gives
    # white-box attacks a zero gradient there (gradient masking); the log-space vote must not
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    confident = torch.nn.Sequential(trained_mlp, _Scale(8.0)).eval()  # saturated softmax
    ensemble = VotingEnsemble([confident]).eval()
    assert torch.allclose(ensemble(x), confident(x).log_softmax(1), atol=1e-4)

    def untouched(model):
        return (fgsm(model, x, y, 0.1) == x).all(dim=(1, 2, 3)).float().mean()

    assert untouched(confident) == 0.0
    assert untouched(ensemble) == 0.0  # the probability-space vote left ~60% untouched here


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z * self.factor
