"""Hugging Face models (``--model hf:PATH``): a tiny ViT and a tiny ConvNeXt, built offline from
``transformers`` configs as ``save_pretrained`` writes them, go through train, evaluate, audit,
guard fit and serve; the detector reads the transformer's last block as the model pools it
(ViT: the CLS token), not the patch-embedding convolution of its stem."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from test_serve import png, post, server

from advguard.detection import default_layer
from advguard.detection.features import FeatureCapture, pool_features
from advguard.io import read_metadata
from advguard.models import load_model

transformers = pytest.importorskip("transformers")

MEAN, STD = [0.1307], [0.3081]  # the processor's, not the data's (which would be 0.5 / 0.25)


def save_tiny(kind: str, folder) -> str:
    if kind == "vit":
        config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1,
                                        hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64,
                                        num_labels=10)
        model = transformers.ViTForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(num_channels=1, hidden_sizes=[8, 16],
                                             depths=[1, 1], num_stages=2, num_labels=10)
        model = transformers.ConvNextForImageClassification(config)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": MEAN, "image_std": STD, "do_normalize": True}))
    return f"hf:{folder}"


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_a_hugging_face_model_through_every_entry_point(kind, tmp_path, cli, mnist_test):
    name = save_tiny(kind, tmp_path / kind)
    ckpt = tmp_path / "m.safetensors"
    trained = cli("train", str(ckpt), "--model", name, "--train-limit", "1000", "--epochs", "3",
                  "--batch-size", "32", "-q")  # clean: a tiny ViT learns slowly adversarially
    assert trained.returncode == 0, trained.stderr
    meta = read_metadata(ckpt)
    card = meta["model"]
    assert card["builder"] == name and card["mean"] == MEAN and card["std"] == STD
    assert card["kwargs"]["config"]["model_type"] == kind
    (tmp_path / kind / "config.json").unlink()  # the checkpoint alone rebuilds it
    model, _ = load_model(ckpt)
    assert model(mnist_test.x[:2]).shape == (2, 10)
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] - 0.15, losses  # it learns (ViT: 2.20 -> 1.86 measured)

    layer = default_layer(model)
    assert layer.inputs and layer.name.endswith("classifier")  # not the stem's convolution
    with FeatureCapture(model, layer) as cap:
        model(mnist_test.x[:3])
    width = 32 if kind == "vit" else 16
    assert cap.features.shape == (3, width)
    if kind == "vit":  # the classifier reads the CLS token after the last block's norm
        inner = model.module
        hidden = inner.vit((mnist_test.x[:3] - MEAN[0]) / STD[0]).last_hidden_state
        assert torch.allclose(cap.features, hidden[:, 0], atol=1e-5)

    evaluated = cli("evaluate", str(ckpt), "--test-limit", "40", "--grid", "0,0.1", "-q")
    assert evaluated.returncode == 0 and "grid mean" in evaluated.stdout, evaluated.stderr
    audited = cli("audit", str(ckpt), "--only-autoattack", "--test-limit", "6", "--eps", "0.3",
                  "-q")
    assert audited.returncode == 0 and "AutoAttack" in audited.stdout, audited.stderr
    guard = tmp_path / "guard"
    fitted = cli("guard", "fit", str(ckpt), "--out", str(guard), "--k", "10", "--train-limit",
                 "500", "--val-size", "100", "-q")
    assert fitted.returncode == 0 and "threshold" in fitted.stdout, fitted.stderr
    key = next(iter(json.loads((guard / "keys.json").read_text())["keys"]))
    with server(guard) as url:
        health = httpx.get(f"{url}/v1/health", timeout=10).json()
        assert any(layer.name in str(v) for v in health.values())
        r = post(url, key, files=[("files", ("d.png", png(mnist_test.x[0]), "image/png"))])
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["verdict"] in ("trusted", "flagged")


def test_a_block_that_returns_a_tuple_is_read_at_its_hidden_states():
    hidden = torch.randn(2, 5, 8)
    assert torch.equal(pool_features((hidden, None)), hidden.mean(dim=1))
    assert torch.equal(pool_features(hidden), hidden.mean(dim=1))


def test_a_folder_without_a_config_is_one_clear_error(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    result = cli("train", str(tmp_path / "m.safetensors"), "--model", f"hf:{tmp_path / 'empty'}",
                 "--train-limit", "32", "--epochs", "1")
    assert result.returncode == 2 and "no config.json there" in result.stderr
