"""The guard service as its users meet it: a real ``advguard serve`` process on a loopback port,
spoken to over HTTP; client state in SQLite (surviving a restart) and in a real Redis server
shared by two service processes; the web page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from advguard.attacks import FGSM, PGD
from advguard.data import load_dataset
from advguard.models import build_model, save_model
from advguard.serve import fit_guard, read_keys
from advguard.training import StrengthMix, TrainConfig, train

POLICY = ["--window", "20", "--min-requests", "10", "--flagged-limit", "0.25", "--cooldown", "0"]


def _needs(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs it)")
        pytest.skip(f"{program} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(guard: Path, *args: str) -> Iterator[str]:
    """``advguard serve GUARD …`` in its own process until the block ends; yields its URL."""
    port = free_port()
    script = Path(sys.executable).with_name("advguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "advguard.cli"]
    proc = subprocess.Popen([*command, "serve", str(guard), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    """A LeNet-5 trained for 3 epochs on 8,000 real MNIST digits and its guard folder."""
    d = tmp_path_factory.mktemp("guard")
    data = load_dataset("mnist", "train", limit=8000)
    torch.manual_seed(0)
    model = build_model("lenet5", "mnist")
    train(model, data, StrengthMix(), None, TrainConfig(epochs=3, batch_size=64), progress=False)
    save_model(d / "lenet.safetensors", model, arch="lenet5", dataset="mnist")
    fit_guard(d / "lenet.safetensors", d / "guard", k=100, train_limit=8000, val_size=1000)
    return d / "guard"


@pytest.fixture(scope="module")
def keys(guard_dir) -> dict[str, str]:
    """client id -> API key: the folder's admin and client-1, plus an attacker and an honest
    client."""
    path = guard_dir / "keys.json"
    obj = json.loads(path.read_text())
    obj["keys"]["attacker-key-0123456789"] = {"id": "attacker"}
    obj["keys"]["honest-key-0123456789ab"] = {"id": "honest"}
    path.write_text(json.dumps(obj))
    return {c.id: k for k, c in read_keys(path).items()}


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    test = load_dataset("mnist", "test", limit=120)
    return {"x": test.x, "y": test.y}


def png(image: torch.Tensor, size: tuple[int, int] | None = None, mode: str = "L") -> bytes:
    img = Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), "L")
    if size is not None:
        img = img.resize(size)
    out = io.BytesIO()
    img.convert(mode).save(out, "PNG")
    return out.getvalue()


def post(url: str, key: str | None, **kw) -> httpx.Response:
    headers = {} if key is None else {"X-API-Key": key}
    return httpx.post(f"{url}/v1/predict", headers=headers, timeout=30, **kw)


def attacked(guard_dir: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FGSM (ε = 0.3) and PGD-20 (ε = 0.3) copies of the digits, alternating, white-box on the
    guarded model."""
    from advguard.ensemble import load_any

    model, _ = load_any(guard_dir / "model.safetensors")
    fgsm_x = FGSM()(model, x, y, 0.3)
    pgd_x = PGD(steps=20)(model, x, y, 0.3)
    return torch.stack([fgsm_x, pgd_x], 1).flatten(0, 1)[:len(x)]


def test_a_valid_image_gets_every_field(guard_dir, keys, digits):
    x = digits["x"]
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{guard_dir}/fields.db") as url:
        r = post(url, keys["client-1"], files=[("files", ("d.png", png(x[0]), "image/png"))])
        assert r.status_code == 200, r.text
        body = r.json()
        (result,) = body["results"]
        assert set(result) == {"name", "class", "probabilities", "score", "threshold",
                               "verdict", "converted"}
        assert result["class"] == int(digits["y"][0]) and result["verdict"] in ("trusted",
                                                                                "flagged")
        assert len(result["probabilities"]) == 10
        assert abs(sum(result["probabilities"]) - 1) < 1e-3 and 0 <= result["score"] <= 1
        assert result["converted"] == [] and body["status"]["requests"] == 1
        # a JSON batch of pixels, and an RGB upload of another size (converted, and said so)
        r = post(url, keys["client-1"], json={"images": x[:3].tolist()})
        assert r.status_code == 200 and [t["class"] for t in r.json()["results"]] == \
            digits["y"][:3].tolist()
        r = post(url, keys["client-1"], files=[("files", ("big.png", png(x[1], (56, 56), "RGB"),
                                                          "image/png"))])
        assert r.status_code == 200
        assert r.json()["results"][0]["converted"] == ["RGB → L",
                                                       "resized 56x56 → 28x28 (bilinear)"]
        health = httpx.get(f"{url}/v1/health").json()
        assert health["input_shape"] == [1, 28, 28] and health["k"] == 100
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "/v1/predict" in schema["paths"] and "/v1/clients/{client_id}/clear" in \
            schema["paths"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'advguard_requests_total{endpoint="/v1/predict",status="200"} 3.0' in metrics
        assert "advguard_verdicts_total" in metrics and "advguard_request_seconds_bucket" in \
            metrics


BAD = [  # (id, request keywords, expected status, part of the detail)
    ("no-key", dict(key=None, json={"images": [[0.0]]}), 401, "valid API key"),
    ("wrong-key", dict(key="not-a-key-of-anyone", json={"images": [[0.0]]}), 401, "API key"),
    ("not-an-image", dict(files=[("files", ("x.png", b"GIF89a not really", "image/png"))]), 422,
     "not a PNG or JPEG"),
    ("empty-upload", dict(files=[("files", ("x.png", b"", "image/png"))]), 422, "empty"),
    ("truncated-png", dict(truncate=True), 422, "truncated or corrupt"),
    ("nan-pixels", dict(content=b'{"images": ' + json.dumps(np.zeros((28, 28)).tolist())
                        .replace("0.0", "NaN", 1).encode() + b"}"), 422, "NaN"),
    ("out-of-range", dict(json={"images": (np.ones((28, 28)) * 2).tolist()}), 422,
     "must lie in [0, 1]"),
    ("wrong-shape", dict(json={"images": np.zeros((3, 28, 28)).tolist()}), 422, "3 channels"),
    ("wrong-size", dict(json={"images": np.zeros((20, 20)).tolist()}), 422, "expects 28x28"),
    ("ragged", dict(json={"images": [[0.1, 0.2], [0.3]]}), 422, "rows of equal length"),
    ("strings", dict(json={"images": [["a"]]}), 422, "nested lists of numbers"),
    ("unknown-field", dict(json={"images": [[0.0]], "eps": 0.3}), 422, "eps: Extra inputs"),
    ("missing-field", dict(json={"pixels": []}), 422, "images: Field required"),
    ("bad-json", dict(content=b'{"images": [[0.1,'), 422, "not valid JSON"),
    ("nested-json", dict(content=b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 422,
     "nested too deeply"),
    ("wrong-type", dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
     "multipart/form-data"),
    ("too-many-images", dict(json={"images": np.zeros((65, 1, 28, 28)).tolist()}), 413,
     "at most 64"),
    ("body-too-large", dict(content=b"0" * (9 * 2 ** 20)), 413, "request body over"),
    ("huge-dimensions", dict(huge=True), 422, "at most"),
    ("unknown-form-field", dict(files=[("picture", ("x.png", b"x", "image/png"))]), 422,
     "unknown form fields"),
]


@pytest.mark.parametrize("kw, status, detail", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_the_right_4xx(kw, status, detail, guard_dir, keys, digits, bad_server):
    kw = dict(kw)
    key = kw.pop("key", keys["client-1"])
    if kw.pop("truncate", False):
        kw["files"] = [("files", ("t.png", png(digits["x"][0])[:80], "image/png"))]
    if kw.pop("huge", False):
        big = io.BytesIO()
        Image.new("L", (5000, 5000)).save(big, "PNG")
        kw["files"] = [("files", ("huge.png", big.getvalue(), "image/png"))]
    if "content" in kw:
        kw.setdefault("headers", {"content-type": "application/json"})
        kw["headers"] = {**kw["headers"], "X-API-Key": key}
        r = httpx.post(f"{bad_server}/v1/predict", timeout=30, **kw)
    else:
        r = post(bad_server, key, **kw)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]
    assert httpx.get(f"{bad_server}/v1/health").status_code == 200  # the worker lives on


@pytest.fixture(scope="module")
def bad_server(guard_dir) -> Iterator[str]:
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{guard_dir}/bad.db") as url:
        yield url


def test_admin_endpoints_need_an_admin_key(bad_server, keys):
    assert httpx.get(f"{bad_server}/v1/clients").status_code == 401
    r = httpx.get(f"{bad_server}/v1/clients", headers={"X-API-Key": keys["client-1"]})
    assert r.status_code == 403 and "not an admin" in r.json()["detail"]
    r = httpx.get(f"{bad_server}/v1/clients", headers={"X-API-Key": keys["admin"]})
    assert r.status_code == 200 and isinstance(r.json(), list)


def _send_until_denied(url: str, key: str, images: torch.Tensor) -> int:
    """Images one per request until the first 403; returns how many were answered."""
    for i, image in enumerate(images):
        r = post(url, key, files=[("files", (f"{i}.png", png(image), "image/png"))])
        if r.status_code == 403:
            assert "denied" in r.json()["detail"] and "flagged" in r.json()["detail"]
            return i
        assert r.status_code == 200, r.text
    return len(images)


def test_the_attacker_is_denied_the_honest_client_served_and_it_survives_a_restart(
        guard_dir, keys, digits):
    x, y = digits["x"], digits["y"]
    adv = attacked(guard_dir, x, y)
    state = f"sqlite:///{guard_dir}/clients-restart.db"
    with server(guard_dir, *POLICY, "--state", state) as url:
        answered = _send_until_denied(url, keys["attacker"], adv)
        assert 10 <= answered < 60
        for i in range(40):  # the honest client sends clean test digits all along
            r = post(url, keys["honest"], files=[("files", (f"{i}.png", png(x[i]), "image/png"))])
            assert r.status_code == 200
            assert r.json()["status"]["denied_until"] is None
        clients = {c["client"]: c for c in httpx.get(
            f"{url}/v1/clients", headers={"X-API-Key": keys["admin"]}).json()}
        assert clients["attacker"]["denied_until"] == "until cleared"
        assert clients["honest"]["denials"] == 0
    with server(guard_dir, *POLICY, "--state", state) as url:  # a restart
        r = post(url, keys["attacker"], json={"images": x[0].tolist()})
        assert r.status_code == 403
        assert post(url, keys["honest"], json={"images": x[0].tolist()}).status_code == 200
        cleared = httpx.post(f"{url}/v1/clients/attacker/clear",
                             headers={"X-API-Key": keys["admin"]})
        assert cleared.status_code == 200 and cleared.json()["denied_until"] is None
        assert post(url, keys["attacker"], json={"images": x[0].tolist()}).status_code == 200


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    program = _needs("redis-server")
    port = free_port()
    proc = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_two_servers_sharing_redis_both_deny_the_attacker(guard_dir, keys, digits, redis_url):
    x, y = digits["x"], digits["y"]
    adv = attacked(guard_dir, x, y)
    with server(guard_dir, *POLICY, "--state", redis_url) as a, \
            server(guard_dir, *POLICY, "--state", redis_url) as b:
        assert post(b, keys["attacker"], json={"images": x[0].tolist()}).status_code == 200
        answered = _send_until_denied(a, keys["attacker"], adv)
        assert answered < 60
        r = post(b, keys["attacker"], json={"images": x[0].tolist()})
        assert r.status_code == 403 and "denied" in r.json()["detail"]
        assert post(b, keys["honest"], json={"images": x[1].tolist()}).status_code == 200
        seen = httpx.get(f"{b}/v1/clients", headers={"X-API-Key": keys["admin"]}).json()
        assert {c["client"] for c in seen} >= {"attacker", "honest"}


def test_the_page_classifies_a_dropped_digit_in_chromium(guard_dir, keys, digits, tmp_path):
    chromium = _needs("chromium")
    from playwright.sync_api import sync_playwright

    image = tmp_path / "digit.png"
    image.write_bytes(png(digits["x"][0]))
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{tmp_path}/page.db") as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent"
                                   ".includes('threshold')")
            page.fill("#key", keys["client-1"])
            page.set_input_files("#file", str(image))
            page.click("#send")
            page.wait_for_selector("#verdict", timeout=30_000)
            verdict = page.inner_text("#verdict")
            assert f"class {int(digits['y'][0])}" in verdict
            assert "trusted" in verdict or "flagged" in verdict
            assert page.locator("#result table tr").count() == 10
            page.fill("#key", keys["admin"])
            page.click("#load-clients")
            page.wait_for_selector("#clients table")
            assert "client-1" in page.inner_text("#clients")
        finally:
            browser.close()
