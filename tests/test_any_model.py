"""Models from anywhere: a user's module wrapped with ``wrap`` behaves exactly as the same network
written as an advguard model, and every model source (zoo, torchvision, timm, a user's factory
with weights) goes through every entry point of the command line."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from torch import nn

from advguard.attacks import FGSM, PGD
from advguard.data import dataset_info
from advguard.detection import KNNDetector
from advguard.errors import CheckpointError, InputError
from advguard.io import read_metadata
from advguard.models import build_model, load_model, load_weights, pick_logits, wrap
from advguard.training import StrengthMix, TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class DictLeNet(nn.Module):
    """LeNet-5 as a user writes it: it takes *normalised* images and returns a dict."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aux": x.mean(dim=(1, 2, 3)), "logits": self.body(x)}


def _pair() -> tuple[nn.Module, nn.Module]:
    """The zoo's LeNet-5 and the same weights as a user's dict-returning module, wrapped."""
    torch.manual_seed(0)
    ours = build_model("lenet5", "mnist")
    info = dataset_info("mnist")
    theirs = wrap(DictLeNet(copy.deepcopy(ours[1:])), mean=info.mean, std=info.std)
    return ours, theirs


def test_a_wrapped_user_model_attacks_trains_and_scores_like_the_same_advguard_model(
        mnist_train, mnist_test):
    ours, theirs = _pair()
    x, y = mnist_test.x[:64], mnist_test.y[:64]
    torch.testing.assert_close(theirs(x), ours(x))
    torch.testing.assert_close(FGSM()(theirs, x, y, 0.2), FGSM()(ours, x, y, 0.2))
    pgd = PGD(steps=5, restarts=1, seed=3)
    torch.testing.assert_close(pgd(theirs, x, y, 0.2), pgd(ours, x, y, 0.2))
    config = TrainConfig(epochs=1, batch_size=100, device="cpu")
    data = mnist_train.subset(slice(0, 300))
    for model in (ours, theirs):
        torch.manual_seed(1)
        train(model, data, StrengthMix((0.1,)), None, config, progress=False)
    for p, q in zip(ours[1:].parameters(), theirs.module.body.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    bank = mnist_train.subset(slice(0, 1000))
    scores = [KNNDetector(k=50, preprocessing="l2").fit(m, bank.x, bank.y).score_samples(x)
              for m in (ours, theirs)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("out", "output", "want"), [
    (torch.ones(2, 3), None, "tensor"),
    ((torch.ones(2, 3), torch.zeros(2)), None, "tuple"),
    ({"logits": torch.ones(2, 3), "h": torch.zeros(2, 5)}, None, "dict"),
    ({"scores": torch.ones(2, 3), "h": torch.zeros(2, 5)}, "scores", "key"),
    ((torch.zeros(2), torch.ones(2, 3)), 1, "index"),
    (type("Out", (), {"logits": torch.ones(2, 3)})(), None, "attribute"),
])
def test_the_logits_are_picked_out_of_any_output(out, output, want):
    assert torch.equal(pick_logits(out, output), torch.ones(2, 3)), want


def test_an_output_without_logits_is_one_clear_error():
    with pytest.raises(InputError, match="say which holds the logits"):
        pick_logits({"a": torch.ones(1), "b": torch.ones(1)})


FACTORY = '''
from torch import nn

def build(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, num_classes))
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user's package on sys.path: ``user_models:build``, and weights for it."""
    (tmp_path / "user_models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    import user_models

    torch.manual_seed(5)
    weights = tmp_path / "user.pt"
    torch.save(user_models.build(10, 1).state_dict(), weights)
    return "user_models:build", weights


SOURCES = ["lenet5", "torchvision:resnet18", "timm:resnet18", "factory"]


@pytest.mark.parametrize("source", SOURCES)
def test_every_model_source_through_every_entry_point(source, tmp_path, cli, factory_module,
                                                       mnist_test):
    name, weights = (factory_module if source == "factory" else (source, None))
    extra = ["--weights", str(weights)] if weights else []
    trust = ["--trust-builder"] if weights else []  # its checkpoint runs the factory's code
    ckpt = tmp_path / "m.safetensors"
    trained = cli("train", str(ckpt), "--model", name, *extra, "--train-limit", "64",
                  "--epochs", "1", "--batch-size", "32", "--strengths", "0.1", "-q")
    assert trained.returncode == 0, trained.stderr
    meta = read_metadata(ckpt)
    assert meta["model"]["builder"] == name and meta["train_config"]["batch_size"] == 32
    model, _ = load_model(ckpt, trust_builder=True)  # rebuilt from the checkpoint alone
    assert model(mnist_test.x[:2]).shape == (2, 10)
    evaluated = cli("evaluate", str(ckpt), *trust, "--test-limit", "16", "--grid", "0,0.1",
                    "--attack", "white-box-pgd", "--pgd-steps", "2", "--pgd-restarts", "1",
                    "-q")
    assert evaluated.returncode == 0 and "grid mean (white-box-pgd)" in evaluated.stdout
    audited = cli("audit", str(ckpt), *trust, "--only-autoattack", "--test-limit", "4",
                  "--eps", "0.5", "-q")  # large: the attacks end at once
    assert audited.returncode == 0 and "AutoAttack" in audited.stdout, audited.stderr
    np.save(tmp_path / "x.npy", mnist_test.x[:3].numpy())
    predicted = cli("predict", str(ckpt), str(tmp_path / "x.npy"), *trust)
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 3
    guard = cli("guard", "fit", str(ckpt), *trust, "--out", str(tmp_path / "guard"), "--k", "10",
                "--train-limit", "200", "--val-size", "40", "-q")
    assert guard.returncode == 0 and "threshold" in guard.stdout, guard.stderr
    # the same model without an advguard checkpoint: builder + the user's weights + data
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    direct = cli("evaluate", "--model", name, "--weights", str(tmp_path / "w.safetensors"),
                 "--data", "mnist", "--test-limit", "16", "--grid", "0", "-q")
    assert direct.returncode == 0 and direct.stdout.split()[-1] == \
        cli("evaluate", str(ckpt), *trust, "--test-limit", "16", "--grid", "0",
            "-q").stdout.split()[-1]


def test_a_checkpoint_cannot_run_code_by_being_opened(factory_module, tmp_path, cli):
    name, weights = factory_module
    ckpt = tmp_path / "m.safetensors"
    assert cli("train", str(ckpt), "--model", name, "--weights", str(weights), "--train-limit",
               "32", "--epochs", "1", "-q").returncode == 0
    for args in (("evaluate", str(ckpt)), ("predict", str(ckpt), str(weights))):
        assert_one_line_error(cli(*args), "loading it imports and runs that package's code")
    with pytest.raises(CheckpointError, match="--trust-builder"):
        load_model(ckpt)
    (tmp_path / "evil.safetensors").write_bytes(b"")
    from advguard.io import save_tensors

    save_tensors(tmp_path / "evil.safetensors", {}, {"arch": "subprocess:getoutput",
                                                     "dataset": "mnist"})
    with pytest.raises(CheckpointError, match="names no zoo architecture"):
        load_model(tmp_path / "evil.safetensors")


def test_a_checkpoint_is_checked_against_the_data_it_is_given(tmp_path, cli):
    ckpt = tmp_path / "m.safetensors"
    assert cli("train", str(ckpt), "--model", "lenet5", "--train-limit", "32", "--epochs", "1",
               "-q").returncode == 0
    result = cli("evaluate", str(ckpt), "--data", "cifar10", "--data-dir",
                 str(SHARED / "cifar-10"), "--test-limit", "8")
    assert_one_line_error(result, "takes 1x28x28 images of 10 classes; cifar10 has 3x32x32")


def test_a_users_weights_load_into_the_builders_model(factory_module, tmp_path):
    name, weights = factory_module
    model = load_weights(build_model(name, "mnist"), weights)
    state = torch.load(weights, weights_only=True)
    assert torch.equal(model.module[0].weight, state["0.weight"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "no_such_package.models:build"], "cannot import the model builder"),
    (["--model", "torchvision:resnet9000"], "torchvision has no model 'resnet9000'"),
    (["--model", "lenet6"], "unknown model 'lenet6'"),
])
def test_a_builder_that_cannot_be_found_is_one_clear_error(args, needle, tmp_path, cli):
    assert_one_line_error(cli("train", str(tmp_path / "m.safetensors"), *args), needle)


def test_weights_that_do_not_fit_the_builder_are_one_clear_error(tmp_path, cli,
                                                                 factory_module):
    _, weights = factory_module
    result = cli("train", str(tmp_path / "m.safetensors"), "--model", "lenet5", "--weights",
                 str(weights))
    assert_one_line_error(result, "do not fit the model")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="not a weights file torch can read weights-only"):
        load_weights(build_model("lenet5", "mnist"), tmp_path / "garbage.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(build_model("lenet5", "mnist"), tmp_path / "list.pt")
