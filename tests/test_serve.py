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
from advguard.detection import DEFAULT_DETECTOR, DETECTORS, DetectorSettings, KNNOptions
from advguard.models import build_model, save_model
from advguard.serve import fit_guard, read_keys
from advguard.serve.guard import GuardFit
from advguard.serve.queries import QueryWatch
from advguard.training import StrengthMix, TrainConfig, train

POLICY = ["--window", "20", "--min-requests", "10", "--flagged-limit", "0.25", "--cooldown", "0"]


def _needs(program: str) -> str:
    """The path of a program the service tests start themselves. Missing, the test fails (it
    is not skipped): the README's test command installs it, as .ci/run does."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: apt-get install redis-server chromium (the "
                    "README's test command does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(guard: Path, port: int, *args: str) -> list[str]:
    script = Path(sys.executable).with_name("advguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "advguard.cli"]
    return [*command, "serve", str(guard), "--port", str(port), *args]


@contextmanager
def server(guard: Path, *args: str, log: Path | None = None) -> Iterator[str]:
    """``advguard serve GUARD …`` in its own process until the block ends; yields its URL. Its
    output goes to ``log`` (a file, so that a talkative server never blocks on a full pipe)."""
    port = free_port()
    log = log or guard.parent / f"serve-{port}.log"
    out = log.open("a")
    proc = subprocess.Popen(serve_command(guard, port, *args), stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {log.read_text()}")
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
        out.close()


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    """A LeNet-5 trained for 3 epochs on 8,000 real MNIST digits and its guard folder."""
    d = tmp_path_factory.mktemp("guard")
    data = load_dataset("mnist", "train", limit=8000)
    torch.manual_seed(0)
    model = build_model("lenet5", "mnist")
    train(model, data, StrengthMix(), None, TrainConfig(epochs=3, batch_size=64), progress=False)
    save_model(d / "lenet.safetensors", model, arch="lenet5", dataset="mnist")
    fit_guard(d / "lenet.safetensors", d / "guard", detector=DetectorSettings(k=100),
              fit=GuardFit(train_limit=8000, val_size=1000))
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


@pytest.mark.parametrize("detector", [n for n in DETECTORS if n != DEFAULT_DETECTOR])
def test_a_guard_fits_and_loads_with_every_detector(detector, guard_dir, digits, tmp_path):
    """``guard fit --detector`` for each registered detector: the folder loads the detector it
    was fitted with, keeps ~98% of clean digits and flags PGD copies that fool the model more
    often than clean digits (how much more is the detector's: see RESULTS)."""
    from advguard.serve.guard import Guard

    out = tmp_path / detector
    settings = DetectorSettings(detector=detector,
                                k=100 if DETECTORS[detector].Options is KNNOptions else None)
    fit_guard(guard_dir.parent / "lenet.safetensors", out, detector=settings,
              fit=GuardFit(train_limit=4000, val_size=800))
    g = Guard.load(out)
    assert g.detector.name == detector and g.config.detector == detector
    assert g.config.layers == g.detector.layer_keys and 0.97 <= g.config.calibration_kept <= 1.0
    assert len(g.config.layers) == len(g.detector.resolve_layers(g.model))  # its defaults
    x, y = digits["x"], digits["y"]
    clean = g.verdicts(x)
    right = clean.predicted == y.numpy()
    assert clean.trusted[right].mean() > 0.9
    adv = PGD(steps=20)(g.model, x, y, 0.3)
    v = g.verdicts(adv)
    fooled = v.predicted != y.numpy()
    assert fooled.sum() > 50
    if g.config.layers:  # deep features; the logits alone (energy) trust PGD's confident answers
        assert (~v.trusted[fooled]).mean() > (~clean.trusted[right]).mean() + 0.05


def test_a_deep_knn_guard_serves(guard_dir, keys, digits, tmp_path, cli):
    out = tmp_path / "dknn"
    proc = cli("guard", "fit", str(guard_dir.parent / "lenet.safetensors"), "--out", str(out),
               "--detector", "dknn", "--train-limit", "3000", "--val-size", "600", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "dknn guard" in proc.stdout
    shutil.copyfile(guard_dir / "keys.json", out / "keys.json")
    with server(out, *POLICY) as url:
        health = httpx.get(f"{url}/v1/health", timeout=10).json()
        assert health["detector"] == "dknn" and len(health["layers"]) == 3
        r = post(url, keys["client-1"], files=[("files", ("d.png", png(digits["x"][0]),
                                                           "image/png"))])
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["class"] == int(digits["y"][0]) and 0 <= result["score"] <= 1
        assert result["unlike_training"] is None  # the bank distance is the kNN guard's


def test_a_valid_image_gets_every_field(guard_dir, keys, digits):
    x = digits["x"]
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{guard_dir}/fields.db") as url:
        r = post(url, keys["client-1"], files=[("files", ("d.png", png(x[0]), "image/png"))])
        assert r.status_code == 200, r.text
        body = r.json()
        (result,) = body["results"]
        assert set(result) == {"name", "class", "probabilities", "score", "threshold",
                               "verdict", "unlike_training", "converted"}
        assert result["unlike_training"] is False
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
        # noise is unlike every training digit: flagged, and evidence only if its score is low
        before = r.json()["status"]["recent_flagged"]
        noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        r = post(url, keys["client-1"], json={"images": noise.tolist()})
        (odd,) = r.json()["results"]
        assert odd["unlike_training"] is True and odd["verdict"] == "flagged"
        assert r.json()["status"]["recent_flagged"] == before + int(odd["score"] <
                                                                     odd["threshold"])
        health = httpx.get(f"{url}/v1/health").json()
        assert health["input_shape"] == [1, 28, 28] and health["settings"]["k"] == 100
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "/v1/predict" in schema["paths"] and "/v1/clients/{client_id}/clear" in \
            schema["paths"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'advguard_requests_total{endpoint="/v1/predict",status="200"} 4.0' in metrics
        assert "advguard_verdicts_total" in metrics and "advguard_request_seconds_bucket" in \
            metrics


def encoded(fmt: str, **kw) -> bytes:
    """A real 28x28 grey image file in ``fmt`` (Pillow's encoder)."""
    out = io.BytesIO()
    Image.new("L", (28, 28), 128).save(out, fmt, **kw)
    return out.getvalue()


def apng() -> bytes:
    out = io.BytesIO()
    Image.new("L", (28, 28), 0).save(out, "PNG", save_all=True,
                                     append_images=[Image.new("L", (28, 28), 255)])
    return out.getvalue()


def blank_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (side, side)).save(out, "PNG")
    return out.getvalue()


def grid(value: str) -> bytes:
    """A 28x28 JSON image of zeros whose first pixel is ``value`` (raw JSON text)."""
    rows = json.dumps(np.zeros((28, 28)).tolist())
    return b'{"images": ' + rows.replace("0.0", value, 1).encode() + b"}"


def upload(data: bytes, name: str = "x.png") -> dict:
    return dict(files=[("files", (name, data, "image/png"))])


# The service's hostile-input table: (id, request keywords, status, part of the one-line
# detail). Each row is sent to one real server; docs/SERVING.md lists the same rows.
BAD = [
    ("no-key", dict(key=None, json={"images": [[0.0]]}), 401, "valid API key"),
    ("wrong-key", dict(key="not-a-key-of-anyone", json={"images": [[0.0]]}), 401, "API key"),
    ("not-an-image", upload(b"no image format at all"), 422, "not a PNG or JPEG"),
    ("empty-upload", upload(b""), 422, "empty"),
    ("truncated-png", dict(truncate=True), 422, "truncated or corrupt"),
    ("gif", upload(encoded("GIF")), 415, "GIF images are not accepted"),
    ("tiff", upload(encoded("TIFF")), 415, "TIFF images are not accepted"),
    ("webp", upload(encoded("WEBP")), 415, "WebP images are not accepted"),
    ("bmp", upload(encoded("BMP")), 415, "BMP images are not accepted"),
    ("animated-png", upload(apng()), 422, "animated PNG of 2 frames"),
    ("huge-dimensions", upload(blank_png(5000), "huge.png"), 413, "5000x5000"),
    ("pixel-bomb-batch", dict(files=[("files", (f"{i}.png", blank_png(4096), "image/png"))
                                     for i in range(64)]), 413, "pixels; at most"),
    ("nan-pixels", dict(content=grid("NaN")), 422, "NaN"),
    ("out-of-range", dict(json={"images": (np.ones((28, 28)) * 2).tolist()}), 422,
     "must lie in [0, 1]"),
    # orjson would read 25 digits as a float: the body goes to Python's json, which names it
    ("integer-25-digits", dict(content=grid("9" * 25)), 422, "integer of 25 digits"),
    ("integer-401-digits", dict(content=grid("9" * 401)), 422, "integer of 401 digits"),
    ("integer-5000-digits", dict(content=grid("9" * 5000)), 422, "integer of 5000 digits"),
    ("numeric-strings", dict(content=grid('"0.5"')), 422, "got strings"),
    ("booleans", dict(content=grid("true")), 422, "not true/false"),
    ("all-booleans", dict(json={"images": [[True] * 28] * 28}), 422, "not true/false"),
    ("nulls", dict(content=grid("null")), 422, "null"),
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
     "65 images in one request; at most 64"),
    ("too-many-numbers", dict(content=b'{"images": [' + b"0," * 60_000 + b"0]}"), 413,
     "more numbers than 64 images of 1x28x28"),
    ("too-many-files", dict(files=[("files", (f"{i}.png", b"x", "image/png"))
                                   for i in range(66)]), 413, "at most 64 images"),
    ("json-body-too-large", dict(content=b"0" * (2 * 2 ** 20)), 413,
     "a JSON body of pixels is at most"),
    ("body-too-large", dict(content=b"0" * (9 * 2 ** 20),
                            headers={"content-type": "multipart/form-data; boundary=x"}), 413,
     "a request body is at most 8388608 bytes"),
    ("unknown-form-field", dict(files=[("picture", ("x.png", b"x", "image/png"))]), 422,
     "unknown form fields"),
]


def counted(url: str, status: int) -> float:
    """How many answers of ``status`` /metrics has counted, over every endpoint."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("advguard_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("kw, status, detail", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_the_right_4xx(kw, status, detail, keys, digits, bad_server):
    url, log = bad_server
    kw = dict(kw)
    key = kw.pop("key", keys["client-1"])
    if kw.pop("truncate", False):
        kw["files"] = [("files", ("t.png", png(digits["x"][0])[:80], "image/png"))]
    before, lines = counted(url, status), len(log.read_text().splitlines())
    if "content" in kw:
        kw.setdefault("headers", {"content-type": "application/json"})
        kw["headers"] = {**kw["headers"], "X-API-Key": key or ""}
        r = httpx.post(f"{url}/v1/predict", timeout=30, **kw)
    else:
        r = post(url, key, **kw)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert httpx.get(f"{url}/v1/health").status_code == 200  # the worker lives on
    assert counted(url, status) == before + 1
    new = log.read_text().splitlines()[lines:]
    assert not any("Traceback" in line or "ERROR" in line for line in new), new


@pytest.fixture(scope="module")
def bad_server(guard_dir) -> Iterator[tuple[str, Path]]:
    log = guard_dir.parent / "bad-server.log"
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{guard_dir}/bad.db",
                "--header-timeout", "2", "--body-timeout", "2", log=log) as url:
        yield url, log


def raw_exchange(url: str, data: list[bytes], pause: float = 0.0, wait: float = 10.0
                 ) -> tuple[bytes, float]:
    """Send ``data`` piece by piece over one TCP connection (``pause`` seconds apart) and read
    until the server closes it; returns what came back and how long the server took."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        t0 = time.monotonic()
        try:
            for piece in data:
                conn.sendall(piece)
                time.sleep(pause)
        except OSError:  # closed by the server while we were still sending
            pass
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer, time.monotonic() - t0


def test_16_bit_and_sideways_uploads_are_read_as_their_8_bit_upright_versions(bad_server, keys,
                                                                              digits):
    """Over HTTP: a 16-bit PNG of a digit and a JPEG-style sideways copy with its EXIF
    orientation get the class and score of the plain 8-bit upload, with the conversion named."""
    from test_images import png16

    url, _ = bad_server
    grey = digits["x"][3, 0].numpy()
    plain = post(url, keys["client-1"], **upload(png(digits["x"][3]))).json()["results"][0]
    deep = post(url, keys["client-1"],
                **upload(png16(np.round(grey * 65535).astype(np.uint16)))).json()["results"][0]
    assert deep["converted"] == ["16-bit samples scaled by 1/65535"]
    assert deep["class"] == plain["class"] and abs(deep["score"] - plain["score"]) < 0.02
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise; the tag says: turn counter-clockwise to view
    out = io.BytesIO()
    Image.fromarray(np.rot90(np.round(grey * 255).astype(np.uint8), -1), "L").save(
        out, "PNG", exif=exif.tobytes())
    turned = post(url, keys["client-1"], **upload(out.getvalue())).json()["results"][0]
    assert turned["converted"] == ["EXIF orientation 8 applied (rotated 90° counter-clockwise)"]
    assert turned["class"] == plain["class"] and abs(turned["score"] - plain["score"]) < 1e-6


def test_slow_and_idle_connections_are_closed(bad_server, keys):
    url, log = bad_server
    lines = len(log.read_text().splitlines())
    key = keys["client-1"].encode()
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + key + b"\r\n")
    # idle: a connection that never sends a byte is closed after the header timeout (2 s)
    answer, took = raw_exchange(url, [])
    assert answer == b"" and 1.5 < took < 6
    # slow headers: one byte every 0.5 s
    answer, took = raw_exchange(url, [bytes([b]) for b in head], pause=0.5)
    assert answer == b"" and 1.5 < took < 6
    # headers that go on past 16 KiB unfinished (httptools would hold them all): 431, closed
    answer, took = raw_exchange(url, [head] + [b"X-Pad: " + b"a" * 4000 + b"\r\n"] * 8,
                                pause=0.05)
    assert answer.startswith(b"HTTP/1.1 431") and took < 3
    # a Content-Length larger than the body: 408 after the body timeout (2 s), not a hang
    before = counted(url, 408)
    answer, took = raw_exchange(url, [head + b"Content-Length: 1000\r\n\r\n" + b'{"images"'])
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer
    assert 1.5 < took < 6 and counted(url, 408) == before + 1
    # a body sent a byte at a time: 408 too
    answer, took = raw_exchange(url, [head + b"Content-Length: 100\r\n\r\n"] + [b" "] * 40,
                                pause=0.25)
    assert answer.startswith(b"HTTP/1.1 408") and took < 8
    # a client that leaves mid-body: one line, no traceback, counted as 499
    before = counted(url, 499)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"images": [')
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while counted(url, 499) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted(url, 499) == before + 1
    assert httpx.get(f"{url}/v1/health").status_code == 200
    new = log.read_text().splitlines()[lines:]
    assert not any("Traceback" in line or "ERROR" in line for line in new), new
    assert any('"event": "disconnect"' in line for line in new)


def test_refused_requests_spend_the_rate_limit(guard_dir, keys, digits):
    """Bodies refused with 413 count toward the sender's rate, like answered ones."""
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{guard_dir}/rate.db", "--rate",
                "0.01", "--burst", "3") as url:
        for _ in range(3):
            r = httpx.post(f"{url}/v1/predict", content=b"0" * (3 * 2 ** 20), timeout=30,
                           headers={"X-API-Key": keys["attacker"],
                                    "content-type": "application/json"})
            assert r.status_code == 413
        r = post(url, keys["attacker"], json={"images": digits["x"][0].tolist()})
        assert r.status_code == 429 and "requests/s" in r.json()["detail"]
        assert post(url, keys["honest"], json={"images": digits["x"][0].tolist()}
                    ).status_code == 200  # another key's bucket is its own
        assert counted(url, 429) == 1


def test_admin_endpoints_need_an_admin_key(bad_server, keys):
    bad_server, _ = bad_server
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
        assert 9 <= answered < 60  # the request that brings the denial is not answered
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


@contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real ``redis-server`` on a loopback port until the block ends; yields its URL."""
    program = _needs("redis-server")
    port = port or free_port()
    proc = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
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


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


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


# --- query-based attackers: stateful detection, dilution, races, what answers reveal --------

def probing(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` queries of a SimBA-like probe of digit ``x``: each the last with one pixel moved by
    0.2 (down where it would pass 1), so no query repeats an earlier one."""
    gen = torch.Generator().manual_seed(seed)
    image, out = x[None].clone(), []
    for _ in range(n):
        i = int(torch.randint(x.numel(), (1,), generator=gen))
        image = image.clone()
        v = float(image.view(-1)[i])
        image.view(-1)[i] = v + 0.2 if v <= 0.8 else v - 0.2
        out.append(image)
    return torch.cat(out)


def _answered_until_denied(urls: list[str], key: str, images: torch.Tensor) -> int:
    """One image per request, round-robin over ``urls``, until the first 403."""
    for i, image in enumerate(images):
        r = post(urls[i % len(urls)], key, json={"images": image.tolist()})
        if r.status_code == 403:
            assert "near-copies" in r.json()["detail"], r.text
            return i
        assert r.status_code == 200, r.text
    return len(images)


WATCHED = ["--cooldown", "0", "--max-repeats", "5"]  # the share and flagged rules as default


def test_a_probing_client_is_denied_and_its_history_survives_a_restart(guard_dir, keys, digits):
    """A stream of near-copies from one key is denied after the watch's k untested queries (the
    pixel view's query_view_k) and 5 detections; a client sending 100 distinct test digits is
    not; the history is in the SQLite file, so a restart does not give the prober a fresh
    start."""
    x, k = digits["x"], QueryWatch().view_k
    probe = probing(x[0], 40)
    state = f"sqlite:///{guard_dir}/watch-restart.db"
    with server(guard_dir, *WATCHED, "--state", state) as url:
        for i in range(100):
            r = post(url, keys["honest"], json={"images": x[i].tolist()})
            assert r.status_code == 200, r.text
        assert r.json()["status"]["recent_repeats"] == 0 and r.json()["status"]["queries"] == 100
        assert _answered_until_denied([url], keys["client-1"], probe[:k - 1]) == k - 1
    with server(guard_dir, *WATCHED, "--state", state) as url:  # a restart
        assert _answered_until_denied([url], keys["client-1"], probe[k - 1:]) == 5  # k+4 in all
        health = httpx.get(f"{url}/v1/health").json()
        assert health["query_watch"] is True and health["outputs"] == "probabilities"
        assert "advguard_query_repeats_total 5.0" in httpx.get(f"{url}/metrics").text
    with server(guard_dir, *WATCHED, "--no-query-watch", "--state",
                f"sqlite:///{guard_dir}/unwatched.db") as url:  # the option that turns it off
        assert _answered_until_denied([url], keys["client-1"], probe) == len(probe)
        assert httpx.get(f"{url}/v1/health").json()["query_watch"] is False


def test_a_camera_is_served_and_a_probe_learns_nothing_from_its_near_copies(guard_dir, keys,
                                                                          digits):
    """With the defaults: a fixed camera sending 40 noisy frames of one digit is never denied
    and every frame is answered (after the watch's first k, as an earlier frame was); a
    SimBA-like probe sent through another key and one blinded with noise of ±0.3 on half the
    image get, from their (k+1)-th query on, only answers they already had — the very same
    probabilities — so a score-based attack has nothing to climb on."""
    x, k = digits["x"], QueryWatch().view_k
    gen = torch.Generator().manual_seed(3)
    camera = (x[5][None] + 0.02 * torch.randn(40, 1, 28, 28, generator=gen)).clamp(0, 1)
    blind = torch.zeros(40, 1, 28, 28)
    blind[:, :, :, :14] = (torch.rand(40, 1, 28, 14, generator=gen) * 2 - 1) * 0.3
    probes = {"client-1": probing(x[6], 40, seed=3),
              "attacker": (probing(x[7], 40, seed=4) + blind).clamp(0, 1)}
    with server(guard_dir, "--state", f"sqlite:///{guard_dir}/camera.db") as url:
        answers = [post(url, keys["honest"], json={"images": f.tolist()}) for f in camera]
        assert all(r.status_code == 200 for r in answers)
        assert {r.json()["results"][0]["class"] for r in answers} == {int(digits["y"][5])}
        for who, probe in probes.items():
            seen = []
            for q in probe:
                r = post(url, keys[who], json={"images": q.tolist()})
                assert r.status_code == 200, r.text
                seen.append(tuple(r.json()["results"][0]["probabilities"]))
            assert set(seen[k:]) <= set(seen[:k]), who  # nothing it did not have already
            assert r.json()["status"]["recent_repeats"] >= 40 - k - 1


def test_two_servers_sharing_redis_share_every_clients_query_history(guard_dir, keys, digits,
                                                                       redis_url):
    probe, k = probing(digits["x"][1], 40, seed=1), QueryWatch().view_k
    with server(guard_dir, *WATCHED, "--state", redis_url) as a, \
            server(guard_dir, *WATCHED, "--state", redis_url) as b:
        assert _answered_until_denied([a, b], keys["client-1"], probe) == k + 4
        seen = {c["client"]: c for c in httpx.get(
            f"{a}/v1/clients", headers={"X-API-Key": keys["admin"]}).json()}
        assert seen["client-1"]["queries"] == k + 5 and seen["client-1"]["recent_repeats"] == 5
        assert seen["client-1"]["recent_flips"] == 0  # the admin sees the flips counted too


def test_label_outputs_reveal_no_probabilities_and_noise_is_unlike_training(guard_dir, keys,
                                                                             digits):
    x = digits["x"]
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 1, 28, 28, generator=gen)
    with server(guard_dir, "--outputs", "label", "--state",
                f"sqlite:///{guard_dir}/label.db") as url:
        answers = [post(url, keys["client-1"], json={"images": x[:3].tolist()}),
                   post(url, keys["client-1"],
                        files=[("files", ("d.png", png(x[0]), "image/png"))]),
                   post(url, keys["client-1"], json={"images": noise.tolist()})]
        for r in answers:
            assert r.status_code == 200, r.text
            for result in r.json()["results"]:
                assert set(result) == {"name", "class", "verdict", "unlike_training",
                                       "converted"}
            assert "probabilit" not in r.text and "score\"" not in r.text.replace(
                "mean_score", "")
        (odd,) = answers[2].json()["results"]
        assert odd["verdict"] == "flagged" and odd["unlike_training"] is True
        assert httpx.get(f"{url}/v1/health").json()["outputs"] == "label"
        # the attacker who reads everything an answer holds: before, the status's window mean
        # gave each query's exact kNN score back; now the only number that is not a count
        # is the time it was last seen
        for i in range(10):
            r = post(url, keys["attacker"], json={"images": x[10 + i].tolist()})
            assert set(_fractional(r.json())) <= {"status.last_seen"}, r.text
            assert not {"window_mean_score", "recent_repeats", "queries", "recent_flips"} & set(
                r.json()["status"])
    with server(guard_dir, "--outputs", "top1", "--decimals", "2", "--count-unlike",
                "--no-flagged-class", "--state", f"sqlite:///{guard_dir}/top1.db") as url:
        (result,) = post(url, keys["client-1"], json={"images": x[0].tolist()}).json()["results"]
        assert set(result) >= {"class", "confidence"} and "probabilities" not in result
        assert result["confidence"] == round(result["confidence"], 2)
        before = post(url, keys["honest"], json={"images": x[1].tolist()}).json()
        r = post(url, keys["honest"], json={"images": noise.tolist()}).json()
        assert r["results"][0]["unlike_training"] is True
        assert r["status"]["recent_flagged"] == before["status"]["recent_flagged"] + 1
        # failing closed: a flagged answer carries its verdict and no class, no confidence
        assert r["results"][0]["class"] is None and "confidence" not in r["results"][0]


def _fractional(obj, path: str = "") -> list[str]:
    """The paths of every non-integer number in a JSON answer."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _fractional(v, f"{path}.{k}".lstrip("."))]
    if isinstance(obj, list):
        return [p for v in obj for p in _fractional(v, path)]
    return [path] if isinstance(obj, float) and not obj.is_integer() else []


def test_parallel_batches_cannot_outrun_the_flagged_budget_and_images_are_rate_limited(
        guard_dir, keys, digits):
    """Ten 16-image requests of attacked digits sent at once (before, seven 64-image requests
    were answered before the first 403): the flagged images answered stay under the budget.
    The image rate counts every image of a batch."""
    import asyncio

    x, y = digits["x"], digits["y"]
    adv = attacked(guard_dir, x, y)
    with server(guard_dir, "--flagged-limit", "0", "--max-flagged", "20", "--no-query-watch",
                "--cooldown", "0", "--image-burst", "160", "--image-rate", "1",
                "--state", f"sqlite:///{guard_dir}/race.db") as url:
        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*(
                    c.post("/v1/predict", json={"images": adv[16 * i:16 * i + 16].tolist()},
                           headers={"X-API-Key": keys["attacker"]}) for i in range(7)))

        answers = asyncio.run(send_all())
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 403}, codes
        evidence = sum(t["score"] < t["threshold"] for r in answers if r.status_code == 200
                       for t in r.json()["results"])  # what the budget counts
        assert evidence < 20 and codes.count(403) >= 1  # the budget was reached, not passed
        # another key's bucket is its own: 160 images at once, then about one a second
        for _ in range(2):
            assert post(url, keys["honest"], json={"images": x[:64].tolist()}).status_code == 200
        r = post(url, keys["honest"], json={"images": x[64:128].tolist()})
        assert r.status_code == 429 and "images per second" in r.json()["detail"]
        assert post(url, keys["honest"], json={"images": x[:8].tolist()}).status_code == 200


# --- the client-state store checks itself --------------------------------------------------

def _filled_state(path: Path, clients: int = 400) -> Path:
    """A real client-state file with enough rows to span many pages."""
    from advguard.serve import Policy, SQLiteStore

    store = SQLiteStore(path, Policy())
    for i in range(clients):
        store.record(f"client-{i:04d}", [i % 3 == 0] * 5, [0.5] * 5)
    store.close()
    import sqlite3

    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    return path


def _scrambled(path: Path) -> Path:
    """Random bytes over every page but the first: the header stays intact."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    rng = np.random.default_rng(0)
    data[page:] = rng.integers(0, 256, len(data) - page, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _another_schema(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE clients (name TEXT)")


CORRUPT = [  # (id, how the state file at the path is made)
    ("garbage", lambda p: p.write_bytes(b"this is not a database " * 100)),
    ("truncated", lambda p: p.write_bytes(_filled_state(p).read_bytes()[:5000])),
    ("scrambled-pages", lambda p: _scrambled(_filled_state(p))),
    ("another-schema", _another_schema),
]


@pytest.mark.parametrize("make", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_a_corrupt_state_file_is_refused_in_one_line_and_reset_keeps_a_copy(
        make, guard_dir, keys, digits, tmp_path, cli):
    from conftest import assert_one_line_error

    path = tmp_path / "clients.db"
    make(path)
    broken = path.read_bytes()
    result = cli("serve", str(guard_dir), "--state", f"sqlite:///{path}")
    assert_one_line_error(result, f"{path} is not a usable client-state database")
    assert "--reset-state" in result.stderr and path.read_bytes() == broken  # untouched
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{path}", "--reset-state") as url:
        r = post(url, keys["client-1"], json={"images": digits["x"][0].tolist()})
        assert r.status_code == 200 and r.json()["status"]["requests"] == 1
        assert httpx.get(f"{url}/v1/health").json()["store"] == {"kind": "sqlite", "ok": True,
                                                                 "detail": None}
    (copy,) = tmp_path.glob("clients.db.*.bak")
    assert copy.read_bytes() == broken


def test_a_state_error_while_serving_is_a_503_and_health_says_so(guard_dir, keys, digits,
                                                                 tmp_path):
    import sqlite3

    path = tmp_path / "clients.db"
    one = {"images": digits["x"][0].tolist()}
    with server(guard_dir, *POLICY, "--state", f"sqlite:///{path}") as url:
        assert post(url, keys["client-1"], json=one).status_code == 200
        with sqlite3.connect(path) as db:  # another program breaks the file under the service
            db.execute("DROP TABLE clients")
        r = post(url, keys["client-1"], json=one)
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("client state unavailable") and \
            "no such table: clients" in r.json()["detail"]
        health = httpx.get(f"{url}/v1/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "clients" in health.json()["store"]["detail"]
        assert counted(url, 503) == 2


def test_redis_going_away_is_a_503_and_its_return_heals_the_service(guard_dir, keys, digits,
                                                                    tmp_path):
    port = free_port()
    one = {"images": digits["x"][0].tolist()}
    with redis_server(tmp_path, port) as redis_url:
        with server(guard_dir, *POLICY, "--state", redis_url) as url:
            assert post(url, keys["client-1"], json=one).status_code == 200
            _stop_redis(port)
            r = post(url, keys["client-1"], json=one)
            assert r.status_code == 503 and "Redis at 127.0.0.1" in r.json()["detail"]
            assert httpx.get(f"{url}/v1/health").status_code == 503
            with redis_server(tmp_path, port):
                assert httpx.get(f"{url}/v1/health").status_code == 200
                assert post(url, keys["client-1"], json=one).status_code == 200


def _stop_redis(port: int) -> None:
    import redis

    try:
        redis.Redis(port=port).shutdown(nosave=True)
    except redis.ConnectionError:  # it closes the connection as it goes
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
        except redis.ConnectionError:
            return
        time.sleep(0.1)
    raise AssertionError("redis-server did not stop")


def test_keys_are_kept_as_digests_and_found_in_one_step(monkeypatch):
    """Only SHA-256 digests of the keys are held, and a key is found by its digest: one hash
    per lookup whatever the number of keys (it was one comparison per stored key: 5,000 keys
    made the lookup a tenth of the event loop's time under load)."""
    import hashlib

    from advguard.serve import Client
    from advguard.serve.guard import KeyRing

    keys = {f"key-{i:04d}-0123456789abcdef": Client(f"c{i}") for i in range(2000)}
    ring = KeyRing(keys)
    held = repr(vars(ring))
    assert not any(k in held for k in keys)  # no key in memory, only digests
    assert len(ring) == 2000
    hashed, compared = [], []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda b: hashed.append(b) or real(b))

    class Digest(bytes):  # a stored digest that counts the comparisons made with it
        def __eq__(self, other: object) -> bool:
            compared.append(1)
            return bytes.__eq__(self, other)

        __hash__ = bytes.__hash__

    ring._clients = {Digest(k): c for k, c in ring._clients.items()}
    assert ring.lookup("key-1999-0123456789abcdef") == Client("c1999")
    assert ring.lookup("key-0000-0123456789abcdeX") is None
    assert ring.lookup("") is None
    assert len(hashed) == 3  # one digest a lookup
    assert len(compared) <= 3  # at most one stored digest compared, not a pass over 2,000


def test_the_documented_refusals_are_the_tested_ones():
    """docs/SERVING.md's list of what is refused is this file's hostile-input table."""
    import re

    doc = (Path(__file__).parents[1] / "docs" / "SERVING.md").read_text(encoding="utf-8")
    section = doc.split("### Refused", 1)[1].split("\n### ", 1)[0]
    documented = {(m[1], int(m[2])) for m in re.finditer(r"^\| `([\w-]+)` \| (\d{3}) \|", section,
                                                         re.MULTILINE)}
    assert documented == {(row[0], row[2]) for row in BAD}


def test_answers_name_the_class_where_the_model_knows_its_names():
    import numpy as np

    from advguard.detection import Verdicts
    from advguard.serve.reveal import Reveal, summary

    v = Verdicts(np.array([1, 0]), np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([0.9, 0.1]),
                 np.array([True, False]), 0.5)
    assert summary(v, 0, 2, Reveal(), ("cat", "dog"))["label"] == "dog"
    assert summary(v, 1, 2, Reveal(), ("cat", "dog"))["label"] == "cat"
    assert "label" not in summary(v, 0, 2, Reveal())  # MNIST's classes have no names
    hidden = summary(v, 1, 2, Reveal(flagged_class=False), ("cat", "dog"))
    assert hidden["class"] is None and "label" not in hidden  # fail closed hides the name too


def test_workers_share_the_cores_and_carry_their_threads(monkeypatch):
    """``serve --workers N`` gives each worker the cores shared among them (N workers each
    taking every core oversubscribe them), one worker keeps torch's default, ``--threads``
    wins; the setting reaches the workers through the environment."""
    from advguard.serve.app import ENV, Settings, worker_threads

    cores = len(os.sched_getaffinity(0))
    assert worker_threads(1) is None
    assert worker_threads(2) == max(1, cores // 2)
    assert worker_threads(cores * 4) == 1
    assert worker_threads(2, 3) == 3 and worker_threads(1, 2) == 2
    monkeypatch.setenv(ENV, Settings(guard_dir="g", threads=1).to_env())
    assert Settings.from_env().threads == 1
