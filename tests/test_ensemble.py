from __future__ import annotations

import pytest
import torch

from advguard.attacks import fgsm
from advguard.ensemble import VotingEnsemble, load_ensemble, save_ensemble, train_parallel
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


def test_train_parallel_gives_one_member_per_strength(mnist_train, tmp_path):
    data = mnist_train.subset(slice(0, 300))
    ensemble, results = train_parallel(lambda: build_model("mlp3", "mnist"), data, [0.1, 0.3],
                                       config=TrainConfig(epochs=1, batch_size=100),
                                       state_dir=tmp_path, progress=False)
    assert len(ensemble.members) == 2 and len(results) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel-0.state.pt",
                                                          "parallel-1.state.pt"]
    a, b = (list(m.parameters())[0] for m in ensemble.members)
    assert not torch.equal(a, b)
