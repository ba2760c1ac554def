"""Helpers shared by the benchmarks: interleaved repeated timing and result files."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Run every function ``repeats`` times, interleaved (a, b, c, a, b, c, …) so that machine
    noise hits them alike; returns the wall times in seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    base = statistics.median(times[baseline])
    return {k: {"median_s": statistics.median(v), "min_s": min(v),
                "ratio_to_" + baseline: statistics.median(v) / base} for k, v in times.items()}


def standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of ``values``, one per independent sample (a client,
    whose queries are not independent of one another); None with fewer than 2."""
    if len(values) < 2:
        return None
    return float(torch.tensor(values, dtype=torch.float64).std() / len(values) ** 0.5)


def model_sha256(guard_dir: Path) -> str:
    """The sha256 of a guard folder's model file: what a result measured."""
    return hashlib.sha256((Path(guard_dir) / "model.safetensors").read_bytes()).hexdigest()


def save(name: str, payload: dict, guard_dir: Path | None = None) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "python": platform.python_version()},
               **({"model_sha256": model_sha256(guard_dir)} if guard_dir else {}), **payload}
    path = RESULTS / f"{name}.json"
    partial = path.with_name(f".{path.name}.partial")  # a result is whole or not there
    try:
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


_HELD: dict[Path, int] = {}  # guard folders this process benchmarks -> their lock's descriptor


def hold(guard_dir: Path) -> None:
    """Claim ``guard_dir`` for this process until it exits: a benchmark deletes its state file
    and rewrites its keys each time it starts a server, so a second benchmark on the same
    folder would pull the first's state from under it (its service then answers 503)."""
    import fcntl
    import os

    folder = Path(guard_dir).resolve()
    if folder in _HELD:
        return
    fd = os.open(folder / ".benchmark.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"another benchmark is running on {guard_dir}: its state and keys "
                         "would be overwritten; wait for it, or copy the guard folder") from None
    _HELD[folder] = fd


def start_server(guard_dir: Path, port: int, state: Path, *args: str) -> subprocess.Popen[bytes]:
    """``advguard serve GUARD_DIR`` on a loopback port with a fresh SQLite state file and the
    request and image rate limits raised (what a benchmark measures is the guard, not the
    rate limit); returns once it answers /v1/health. The folder is held for this process
    (:func:`hold`)."""
    import httpx

    hold(guard_dir)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "advguard.cli", "serve", str(guard_dir),
                             "--port", str(port), "--state", f"sqlite:///{state}",
                             "--rate", "100000", "--burst", "100000", "--image-rate", "1e6",
                             "--image-burst", "1000000", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[str]:
    """A throwaway ``redis-server`` on a loopback port (no persistence) until the block ends;
    yields its URL."""
    import redis

    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def validation_images(dataset: str, count: int, data_dir: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (and labels) of a dataset's seeded validation split: the
    training images a guard holds out of its bank (as ``guard fit`` and ``choose_policy.py``
    split them), where the guard's settings are chosen and checked — never test images."""
    from advguard.data import VAL_SIZE, load_data, train_val_split

    data = load_data(dataset, "train", data_dir=data_dir)
    _, held_out = train_val_split(len(data), min(VAL_SIZE, len(data) // 5), 0)
    picked = [data[int(i)] for i in held_out[:count]]
    return torch.stack([x for x, _ in picked]), torch.tensor([int(y) for _, y in picked])


def guard_parser(out: str) -> argparse.ArgumentParser:
    """The arguments every guard validation script takes: the guard folder, where its named
    dataset lies, and the result file's name."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--guard-dir", type=Path, required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=out)
    return ap

