from __future__ import annotations

import pytest
import torch

from advguard.data import DATASETS
from advguard.errors import CheckpointError, InputError
from advguard.models import MODELS, build_model, load_model, save_model

CASES = [(arch, ds) for ds, info in DATASETS.items() for arch in (info.crafter, info.victim)]


@pytest.mark.parametrize("arch, dataset", CASES)
def test_architectures_build_and_classify(arch, dataset):
    from advguard.data import dataset_info

    info = dataset_info(dataset)
    model = build_model(arch, info).eval()
    out = model(torch.rand(2, info.channels, *info.size))
    assert out.shape == (2, info.num_classes)
    with pytest.raises(InputError, match="model expects images of shape"):
        model(torch.rand(2, info.channels + 1, *info.size))


def test_paper_architectures_have_the_described_layers():
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    nn = torch.nn
    mlp = build_model("mlp3", "mnist")
    assert count(mlp, nn.Linear) == 3 and count(mlp, nn.Conv2d) == 0
    crafter = build_model("cifar-crafter", "cifar10")
    assert (count(crafter, nn.Conv2d), count(crafter, nn.BatchNorm2d),
            count(crafter, nn.MaxPool2d), count(crafter, nn.Linear)) == (3, 3, 3, 2)
    victim = build_model("cifar-victim", "cifar10")
    assert (count(victim, nn.Conv2d), count(victim, nn.MaxPool2d),
            count(victim, nn.Linear)) == (3, 3, 1)
    svhn = build_model("svhn-victim", "svhn")
    assert (count(svhn, nn.Conv2d), count(svhn, nn.MaxPool2d), count(svhn, nn.Linear)) == (3, 3, 2)
    lenet = build_model("lenet5", "mnist")
    assert (count(lenet, nn.Conv2d), count(lenet, nn.Linear)) == (2, 3)


def test_normalisation_lives_in_the_model():
    model = build_model("mlp3", "mnist")
    norm = model[0]
    x = torch.full((1, 1, 28, 28), 0.1307)
    assert torch.allclose(norm(x), torch.zeros_like(x), atol=1e-6)


def test_unknown_model_name():
    with pytest.raises(InputError, match="unknown model 'resnet'.*" + ", ".join(MODELS)):
        build_model("resnet", "mnist")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", "mnist").eval()
    path = save_model(tmp_path / "m.safetensors", model, arch="lenet5", dataset="mnist",
                      test_accuracy=0.5)
    loaded, meta = load_model(path)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert meta["test_accuracy"] == 0.5 and not loaded.training
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_and_mismatched_checkpoints(tmp_path):
    model = build_model("mlp3", "mnist")
    path = save_model(tmp_path / "m.safetensors", model, arch="mlp3", dataset="mnist")
    blob = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "none.safetensors")
    save_model(tmp_path / "wrong.safetensors", model, arch="lenet5", dataset="mnist")
    with pytest.raises(CheckpointError, match="does not match its model 'lenet5'"):
        load_model(tmp_path / "wrong.safetensors")


def test_eval_mode_puts_back_what_it_found_also_when_the_model_was_in_eval_mode():
    """A model wholly in eval mode is left alone (no walk over its modules), but one switched
    to training inside the block is put back in eval mode, as one found training is put back
    in training mode."""
    from torch import nn

    from advguard.models.inference import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
    with eval_mode(model):
        model.train()
    assert not any(m.training for m in model.modules())
    model.train()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
