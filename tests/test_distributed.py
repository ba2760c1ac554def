"""Training under torchrun: 2 CPU processes (gloo) on a small real MNIST subset reach the
accuracy of one process on the same data and seed; a 2-process checkpoint resumes in one
process; the MAT pipeline runs under torchrun with its matrix rows spread over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advguard.data import load_dataset
from advguard.io import read_metadata
from advguard.models import accuracy, build_model
from advguard.training import StrengthMix, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

TOLERANCE = 0.01  # accuracy points (fraction) between 2 processes and 1


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def advguard_script() -> str:
    script = Path(sys.executable).with_name("advguard")
    assert script.exists(), "the advguard console script is not installed"
    return str(script)


def test_two_processes_reach_the_accuracy_of_one(tmp_path):
    args = ["train", "--model", "lenet5", "--train-limit", "2000", "--epochs", "2",
            "--strengths", "0.1,0.2", "--quiet"]
    two = torchrun(advguard_script(), args[0], "two.safetensors", *args[1:], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([advguard_script(), args[0], "one.safetensors", *args[1:]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    m2, m1 = (read_metadata(tmp_path / f"{n}.safetensors") for n in ("two", "one"))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert abs(m2["test_accuracy"] - m1["test_accuracy"]) <= TOLERANCE
    assert m2["test_accuracy"] > 0.6  # it learned
    assert not (tmp_path / "two.state.pt").exists() and not (tmp_path / "two.lock").exists()


def test_stability_training_with_trades_trains_under_torchrun(tmp_path):
    """TRADES with stability training calls the model three times (clean, adversarial,
    near-copy) before one backward pass, which DDP must reduce as one step. (Each rank draws
    its own random starts and moves, not the draws of one process, so two processes differ
    from one as much as a change of seed does: no comparison with one process here.)"""
    run = torchrun(advguard_script(), "train", "two.safetensors", "--model", "lenet5",
                   "--train-limit", "1000", "--epochs", "1", "--strengths", "0.1,0.2",
                   "--recipe", "trades", "--stability", "2", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = read_metadata(tmp_path / "two.safetensors")
    assert meta["processes"] == 2 and meta["recipe"] == "trades"
    assert meta["train_config"]["stability"] == 2
    assert meta["test_accuracy"] > 0.5  # it learned (0.63)


WORKER = """
import sys, torch, torch.distributed as dist
from advguard import distributed
from advguard.data import load_dataset
from advguard.models import build_model
from advguard.training import StrengthMix, TrainConfig, train

barrier = dist.barrier
def stop_after_the_first_epoch():  # as an interrupted run would: the state is written
    barrier()
    raise SystemExit(0)
dist.barrier = stop_after_the_first_epoch
distributed.setup("cpu")
data = load_dataset("mnist", limit=2000)
torch.manual_seed(0)
train(build_model("lenet5", "mnist"), data, StrengthMix((0.1,)), None,
      TrainConfig(epochs=3, batch_size=64), state_path=sys.argv[1], progress=False)
"""


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, caplog):
    (tmp_path / "worker.py").write_text(WORKER)
    state = tmp_path / "run.state.pt"
    stopped = torchrun("worker.py", str(state), cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and saved["steps_per_epoch"] == 32  # 1000 images a rank, 32 a step
    data = load_dataset("mnist", limit=2000)
    test = load_dataset("mnist", "test", limit=500)
    config = TrainConfig(epochs=3, batch_size=64)
    torch.manual_seed(0)
    resumed = build_model("lenet5", "mnist")
    with caplog.at_level("INFO"):
        result = train(resumed, data, StrengthMix((0.1,)), None, config, state_path=state,
                       progress=False)
    assert "resuming after epoch 1" in caplog.text
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    torch.manual_seed(0)
    straight = build_model("lenet5", "mnist")
    train(straight, data, StrengthMix((0.1,)), None, config, progress=False)
    assert abs(accuracy(resumed, test.x, test.y) - accuracy(straight, test.x, test.y)) <= 0.02


def test_the_mat_pipeline_under_torchrun(tmp_path):
    args = ["reproduce", "mat", "--train-limit", "1500", "--test-limit", "200", "--epochs", "1",
            "--crafter-epochs", "1", "--pgd-steps", "2", "--pgd-limit", "100", "--val-size",
            "300", "--grid", "0,0.1,0.2,0.3", "--matrix-epochs", "1", "--walks", "50",
            "--autoattack-limit", "0", "--quiet"]  # AutoAttack: not a rank matter
    two = torchrun(advguard_script(), *args, "--out", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory: two") == 1  # rank 0 alone reports
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    matrix = results["details"]["selection"]["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert {p.name for p in (tmp_path / "two" / "checkpoints").glob("matrix-*.json")} == {
        "matrix-0.json", "matrix-1.json", "matrix-2.json"}  # rows written by both ranks
    assert (tmp_path / "two" / "report.html").is_file()
    # what rank 0 reports is what its saved models do: each single model reloaded here gives
    # the reported white-box FGSM curve on the same 200 test digits (a rank that reported
    # another rank's partial work, a model saved before its last epoch, or a curve measured on
    # other images would not)
    from advguard.evaluation.robustness import ThreatSetting, fgsm_curve
    from advguard.models.checkpoint import load_model

    test = load_dataset("mnist", "test", limit=200)
    checked = 0
    for method, result in results["methods"].items():
        saved = list((tmp_path / "two").rglob(f"{method}.safetensors"))
        if method == "parallel" or not saved:
            continue
        net, _ = load_model(saved[0])
        curve = fgsm_curve(net, test.x, test.y, [0.0, 0.1, 0.2, 0.3])
        assert curve == pytest.approx(result["curves"][ThreatSetting.WHITE_BOX_FGSM.value],
                                      abs=1 / 200 + 1e-9), method
        checked += 1
    assert checked >= 3


FAILING = """
import sys, torch, torch.distributed as dist
from advguard import distributed
distributed.setup("cpu")
if distributed.rank() == 1:  # this rank's command fails: a checkpoint that is not there
    from advguard.cli import main
    sys.argv = ["advguard", "evaluate", "no-such-model.safetensors"]
    main()
dist.all_reduce(torch.zeros(1))  # rank 0 would wait here for rank 1 until the timeout
"""


def test_a_failing_rank_stops_the_others_with_its_error(tmp_path):
    """Rank 1's command fails; rank 0, waiting in a collective, stops with rank 1's error —
    not at the 12-hour timeout, and before torchrun's agent (told here to look every 10 s;
    across nodes it cannot see the other node's workers) would kill it without a word."""
    import time

    (tmp_path / "w.py").write_text(FAILING)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "--monitor-interval", "10", "w.py"],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "error: stopping this rank: rank 1:" in out and "no-such-model.safetensors" in out
    assert time.perf_counter() - t0 < 120


def test_an_audit_under_torchrun_is_the_audit_of_one_process(tmp_path, trained_mlp):
    """Two ranks share the pieces of one audit; every image's outcome is the one process's,
    and the report, written by rank 0 alone, is the same."""
    from advguard.models.checkpoint import save_model

    save_model(tmp_path / "mlp.safetensors", trained_mlp, arch="mlp3", dataset="mnist")
    args = ["audit", "mlp.safetensors", "--eps", "0.1", "--only-autoattack", "--test-limit",
            "40", "--shard-size", "10", "--quiet"]
    two = torchrun(advguard_script(), *args, "--out", "two.json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([advguard_script(), *args, "--out", "one.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    ranks = set()
    for piece in sorted((tmp_path / "two.parts" / "shards").glob("*.json")):
        mine, theirs = json.loads(piece.read_text()), json.loads(
            (tmp_path / "one.parts" / "shards" / piece.name).read_text())
        assert mine["columns"] == theirs["columns"]
        ranks.add(mine["rank"])
    assert ranks == {0, 1}  # both ranks attacked
    r2, r1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert r2["autoattack"] == r1["autoattack"] and r2["images"] == 40
    assert two.stdout.count("worst case over all attacks") == 1


BATCHNORM_WORKER = """
import sys, torch
from torch import nn
from advguard import distributed
from advguard.data import load_dataset
from advguard.training import TrainConfig, train

distributed.setup("cpu")
rank = torch.distributed.get_rank()
data = load_dataset("mnist", limit=256)

class Drifting(torch.utils.data.Dataset):  # reads differ by rank, as unsynchronised crops do
    def __len__(self):
        return len(data)

    def __getitem__(self, i):
        x, y = data[i]
        return x + 0.05 * (2 * rank - 1), y

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, momentum=0.01), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
result = train(net, Drifting(), config=TrainConfig(epochs=1, batch_size=64, device="cpu"),
               progress=False)
with torch.no_grad():
    want = net[0](data.x).mean(dim=(0, 2, 3))  # the layer's inputs over every image
torch.save({"refreshed": result.refreshed_batchnorm, "mean": net[1].running_mean,
            "var": net[1].running_var, "batches": int(net[1].num_batches_tracked),
            "want": want, "weight": net[0].weight.detach()}, f"rank{rank}.pt")
"""


def test_stale_batchnorm_is_re_estimated_once_over_the_ranks_and_alike_on_each(tmp_path):
    """Under torchrun the BatchNorm pass at the end of training is split over the ranks (each
    its half of the 256 images, two batches of 64) and combined: both ranks hold the same
    averages, though each rank reads its images otherwise (shifted by ∓0.05, as ranks drawing
    their own random crops do), whose mean is the layer inputs' mean over all 256 images
    (the shifts cancel: every batch weighs alike, as in one process's pass) and counts the
    four batches. Before, each rank passed over every image and kept its own averages."""
    (tmp_path / "worker.py").write_text(BATCHNORM_WORKER)
    run = torchrun("worker.py", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["refreshed"] == r1["refreshed"] == ["1"]
    assert torch.equal(r0["weight"], r1["weight"])  # DDP kept the weights alike
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["var"], r1["var"])
    assert torch.allclose(r0["mean"], r0["want"], atol=1e-5)
    assert r0["batches"] == 4
