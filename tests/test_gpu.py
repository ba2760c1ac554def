"""The CUDA paths, checked wherever a GPU is at hand (they skip without one; CI has none):
training steps under bf16 and fp16 autocast, an audit batch, a guard fitted on the GPU and a
request it serves. ``python benchmarks/bench_gpu.py`` runs them and times the GPU."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_steps_on_the_gpu_under_autocast(amp, tmp_path, cli):
    from advguard.io import read_metadata

    out = tmp_path / "m.safetensors"
    proc = cli("train", str(out), "--model", "small-cnn", "--device", "cuda", "--amp", amp,
               "--train-limit", "2000", "--epochs", "2", "--strengths", "0.1,0.3", "-q")
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(out)
    assert meta["train_config"]["amp"] == amp and meta["test_accuracy"] > 0.8


def test_an_audit_batch_on_the_gpu_is_the_cpu_audit(tmp_path, cli, trained_mlp):
    from advguard.models.checkpoint import save_model

    save_model(tmp_path / "mlp.safetensors", trained_mlp.cpu(), arch="mlp3", dataset="mnist")
    runs = {}
    for device in ("cpu", "cuda"):
        proc = cli("audit", str(tmp_path / "mlp.safetensors"), "--device", device, "--eps",
                   "0.1", "--only-autoattack", "--test-limit", "100", "--out",
                   str(tmp_path / f"{device}.json"), "-q")
        assert proc.returncode == 0, proc.stderr
        runs[device] = json.loads((tmp_path / f"{device}.json").read_text())
    # kernels differ: a borderline image or two may fall the other way
    assert abs(runs["cuda"]["worst_case_accuracy"] - runs["cpu"]["worst_case_accuracy"]) <= 0.02


def test_a_guard_fitted_on_the_gpu_serves(tmp_path, cli, trained_lenet, mnist_test):
    import httpx
    from test_serve import png, post, server

    from advguard.models.checkpoint import save_model

    save_model(tmp_path / "lenet.safetensors", trained_lenet.cpu(), arch="lenet5",
               dataset="mnist")
    guard = tmp_path / "guard"
    proc = cli("guard", "fit", str(tmp_path / "lenet.safetensors"), "--out", str(guard),
               "--device", "cuda", "--train-limit", "3000", "--val-size", "600", "-q")
    assert proc.returncode == 0, proc.stderr
    key = next(iter(json.loads((guard / "keys.json").read_text())["keys"]))
    with server(guard) as url:
        assert httpx.get(f"{url}/v1/health", timeout=10).status_code == 200
        r = post(url, key, files=[("files", ("d.png", png(mnist_test.x[0]), "image/png"))])
        assert r.status_code == 200 and r.json()["results"][0]["class"] == int(mnist_test.y[0])
