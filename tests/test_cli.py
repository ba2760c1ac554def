"""The command line as a user meets it: one-line errors, and small end-to-end runs.

Commands run in-process through the console entry point (the ``cli`` fixture); one test starts
the installed ``advguard`` script in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from advguard.detection import DETECTORS
from advguard.models import build_model, save_model
from advguard.training import Method


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mlp.safetensors"
    torch.manual_seed(0)
    save_model(path, build_model("mlp3", "mnist"), arch="mlp3", dataset="mnist")
    return path


def _npy(tmp_path: Path, array: np.ndarray) -> str:
    path = tmp_path / "x.npy"
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize("array, needle", [
    (np.random.rand(2, 28, 28).astype(np.float32), "shape (N, C, H, W)"),
    (np.random.rand(2, 3, 28, 28).astype(np.float32), "3 channels"),
    (np.random.rand(2, 1, 28, 28).astype(np.float32) * 255, "must lie in [0, 1]"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN"),
    (np.zeros((2, 1, 28, 28), np.uint8), "floating point"),
])
def test_predict_rejects_bad_images(array, needle, model_file, tmp_path, cli):
    assert_one_line_error(cli("predict", str(model_file), _npy(tmp_path, array)), needle)


def test_predict_classifies_good_images(model_file, tmp_path, cli):
    proc = cli("predict", str(model_file), _npy(tmp_path, np.zeros((3, 1, 28, 28),
                                                                       np.float32)))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3


def test_truncated_checkpoint(model_file, tmp_path, cli):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:1000])
    assert_one_line_error(cli("evaluate", str(cut)), "corrupt or truncated checkpoint")
    assert_one_line_error(cli("evaluate", str(tmp_path / "missing.safetensors")),
                          "checkpoint not found")


def test_unknown_names_and_missing_data(tmp_path, cli):
    assert_one_line_error(cli("reproduce", "mat", "--dataset", "imagenet", "--out",
                                  str(tmp_path / "r")), "unknown dataset 'imagenet'")
    assert_one_line_error(cli("train", str(tmp_path / "m.safetensors"), "--model",
                                  "resnet9", "--train-limit", "10"), "unknown model 'resnet9'")
    assert_one_line_error(cli("reproduce", "mat", "--dataset", "cifar10", "--data-dir",
                                  str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")),
                          "CIFAR-10 not found")
    assert_one_line_error(cli("reproduce", "mat", "--setting", "grey-box", "--out",
                                  str(tmp_path / "r")), "unknown setting")
    assert_one_line_error(cli("reproduce", "mat", "--strengths", "0.1,abc", "--out",
                                  str(tmp_path / "r")), "cannot read strengths")
    assert_one_line_error(cli("reproduce", "mat", "--strengths", "0.1,2", "--out",
                                  str(tmp_path / "r")), "must be a number in [0, 1]")


TINY = ["--train-limit", "1500", "--test-limit", "200", "--epochs", "1", "--crafter-epochs",
        "1", "--pgd-steps", "2", "--pgd-limit", "100", "--val-size", "300",
        "--autoattack-limit", "40", "--quiet"]
NO_AUTOATTACK = ["--autoattack-limit", "0"]  # the column is the end-to-end test's; it is slow


def test_reproduce_mat_end_to_end_and_resume(tmp_path, cli):
    out = tmp_path / "run"
    proc = cli("reproduce", "mat", "--out", str(out), "--strengths", "0.1,0.3", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "paper (Table 1, transfer FGSM)" in proc.stdout
    for name in ["config.json", "results.json", "curves.csv", "curves.png", "table.md"]:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["setting"] == "transfer" and results["attack"] == "transfer-fgsm"
    assert len(results["grid"]) == 11 and results["grid"][-1] == 0.3
    assert results["methods"]["mixed"]["strengths"] == [0.1, 0.3]
    assert results["methods"]["single"]["strengths"] == [0.1]
    for entry in results["methods"].values():
        assert len(entry["curve"]) == 11 and entry["mean"] == pytest.approx(
            sum(entry["curve"]) / 11)
        assert set(entry["curves"]) == {"transfer-fgsm", "white-box-fgsm", "white-box-pgd"}
        aa = entry["autoattack"]  # the AutoAttack column at the top of the grid
        assert aa["images"] == 40 and aa["eps"] == 0.3 and aa["standard"]
        assert aa["robust_accuracy"] <= aa["clean_accuracy"]
    assert not list((out / "checkpoints").glob("*.state.pt"))
    assert "| AutoAttack (standard) at ε = 0.3, first 40 test images |" in proc.stdout
    assert results["details"]["autoattack"]["test_images"] == 40

    # resuming a finished run retrains nothing and reproduces the same numbers
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    again = cli("reproduce", "mat", "--out", str(out), "--strengths", "0.1,0.3", *TINY)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == stamps
    assert json.loads((out / "results.json").read_text()) == results

    # another configuration in the same directory is refused, not mixed in
    assert_one_line_error(cli("reproduce", "mat", "--out", str(out), *TINY),
                          "different configuration (single_strength, strengths)")

    # the saved models evaluate from the CLI
    proc = cli("evaluate", str(out / "checkpoints" / "parallel-members.safetensors"), "--grid",
                   "0,0.3", "--test-limit", "200", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "grid mean (white-box-fgsm)" in proc.stdout


def test_interrupted_training_resumes_from_its_state(tmp_path, cli, monkeypatch):
    out = tmp_path / "m.safetensors"
    import advguard.training.loop as loop

    save_state = loop.save_state

    def save_then_interrupt(path, state):  # Ctrl-C right after epoch 1's state is written
        save_state(path, state)
        raise KeyboardInterrupt

    args = ("train", str(out), "--train-limit", "500", "--epochs", "2", "--batch-size", "100")
    with monkeypatch.context() as m:
        m.setattr(loop, "save_state", save_then_interrupt)
        stopped = cli(*args)
    assert stopped.returncode == 130 and "run the same command to resume" in stopped.stderr
    assert out.with_suffix(".state.pt").is_file() and not out.exists()
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 1" in proc.stderr
    assert out.is_file() and not out.with_suffix(".state.pt").exists()


def test_reproduce_mat_selects_strengths_and_explains_why(tmp_path, cli):
    out = tmp_path / "walk"
    proc = cli("reproduce", "mat", "--out", str(out), "--grid", "0,0.1,0.2,0.3",
                   "--matrix-epochs", "1", "--walks", "100", "--voting", "gated",
                   "--compare-voting", *TINY, *NO_AUTOATTACK)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    sel = results["details"]["selection"]
    assert sel["source"] == "random walk" and sel["candidates"] == [0.1, 0.2, 0.3]
    assert len(sel["matrix"]) == 3 and all(len(r) == 3 for r in sel["matrix"])
    assert sel["mssim"]["mssim"][0] == pytest.approx(1.0)
    for combo in ("parallel", "mixed"):
        chosen = sel[f"{combo}_selection"]
        assert results["methods"][combo]["strengths"] == chosen["walk"]["strengths"]
        assert chosen["exact"]["G"] >= chosen["walk"]["G"] - 1e-12
    assert set(results["details"]["voting"]) >= {"mean", "learned", "gated"}
    table = (out / "table.md").read_text()
    assert "## Strength selection" in table and "## Parallel MAT voting rules" in table

    proc = cli("select-strengths", str(out), "--walks", "100", "--seeds", "5")
    assert proc.returncode == 0, proc.stderr
    assert "exact optimum:" in proc.stdout and "agree: yes" in proc.stdout


def test_select_strengths_from_a_matrix_file(tmp_path, cli):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"strengths": [0.1, 0.2, 0.3],
                                "matrix": [[0.9, 0.5, 0.3], [0.6, 0.9, 0.6], [0.3, 0.5, 0.9]]}))
    proc = cli("select-strengths", str(path), "--penalty", "-0.01", "--seeds", "10")
    assert proc.returncode == 0, proc.stderr
    assert "exact optimum: {0.1, 0.2, 0.3}" in proc.stdout
    path.write_text(json.dumps({"matrix": [[0.9, 0.5]]}))
    assert_one_line_error(cli("select-strengths", str(path)), "must be square")


def test_reproduce_detect_end_to_end(tmp_path, cli):
    out = tmp_path / "detect"
    proc = cli("reproduce", "detect", "--train-limit", "1500", "--val-size", "300",
                   "--queries", "150", "--lbfgs-queries", "20", "--k", "20", "--epochs", "1",
                   "--pgd-steps", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for name in ["config.json", "results.json", "table.md", "roc.png", "threshold.png",
                 "density.png"]:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"none", "l2", "pca-whiten"}
    assert all(set(row) == {"knn", "wknn", "dwknn"} for row in results["table"].values())
    # every detector side by side, each negative with its three numbers
    # a row per registered detector, and NAME-fgsm for one that learns from an attack
    assert set(results["detectors"]) == {*DETECTORS, "mahalanobis-fgsm"}
    for name, row in results["detectors"].items():
        assert {"fgsm", "pgd", "errors", "aggregated"} <= set(row), name
        # a negative set is scored when the attack fooled at least one image
        n = results["detector_details"][name]["n"]
        assert set(row) == {neg for neg, count in n.items() if count}, name
        for m in row.values():
            assert set(m) == {"eer_accuracy", "auroc", "caught_at_keep"}
            assert 0 <= m["caught_at_keep"] <= 1 and 0 <= m["auroc"] <= 1
        det = results["detector_details"][name]
        assert det["adaptive_weight"] in (0.0, 0.001, 0.01, 0.1, 1.0)
        # every surrogate of the detector was tried on validation, beside targeted PGD alone
        surrogates = DETECTORS[name.removesuffix("-fgsm")].surrogates
        assert set(det["adaptive_on_validation"]) == {"none", *surrogates}
        assert det["adaptive_surrogate"] in {"none", *surrogates}
        assert (det["adaptive_surrogate"] == "none") == (det["adaptive_weight"] == 0)
    details = results["detector_details"]
    assert "noise" in details["mahalanobis"]["fitted"]["combined_on"]
    assert "FGSM" in details["mahalanobis-fgsm"]["fitted"]["combined_on"]
    assert len(details["knn-layers"]["layers"]) == 3 and details["knn"]["layers"] == ["6"]
    assert "## Detectors side by side" in (out / "table.md").read_text()

    # Table 2's entries are what the public KNNDetector gives on the run's own model and images
    from advguard.data import load_dataset, train_val_split
    from advguard.detection import KNNDetector
    from advguard.evaluation import auc, eer_accuracy
    from advguard.io import file_sha256, load_tensors
    from advguard.models import load_model

    assert results["model_sha256"] == file_sha256(out / "checkpoints" / "model.safetensors")
    model, _ = load_model(out / "checkpoints" / "model.safetensors")
    full = load_dataset("mnist", "train", limit=1500)
    tr, _ = train_val_split(1500, 300, 0)
    test = load_dataset("mnist", "test", limit=150)
    det = KNNDetector(k=20, weighting="knn", preprocessing="none").fit(model, full.x[tr],
                                                                       full.y[tr])
    pred, score = det.inspect(test.x)
    right = pred == test.y.numpy()
    adv_pred, adv_score = det.inspect(load_tensors(out / "checkpoints" /
                                                   "model-fgsm.safetensors")[0]["x"])
    fooled = (adv_pred != test.y.numpy()) & right
    entry = results["table"]["none"]["knn"]["fgsm"]
    assert entry["n"] == fooled.sum() == results["counts"]["fgsm"]["fooled"]
    assert entry["eer_accuracy"] == pytest.approx(eer_accuracy(score[right], adv_score[fooled]))
    assert entry["auc"] == pytest.approx(auc(score[right], adv_score[fooled]))
    lb = results["counts"]["lbfgs"]
    assert lb["fooled"] + lb["failed"] == lb["attacked"]
    assert "mat" in results and "pca-whiten/dwknn" in results["mat"]
    assert "| pca-whiten | dwknn |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_reproduce_mat_white_box_recipe_pgd_matrix_and_pgd_at(tmp_path, cli):
    out = tmp_path / "wb"
    proc = cli("reproduce", "mat", "--out", str(out), "--setting", "white-box", "--victim",
                   "small-cnn", "--grid", "0,0.1,0.3", "--matrix-epochs", "1", "--walks", "50",
                   "--matrix-val-limit", "100", "--pgd-at", "--pgd-step-size", "0.05", *TINY,
                   *NO_AUTOATTACK)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    details = results["details"]
    assert details["recipe"]["name"] == "fgsm-rs" and details["recipe"]["schedule"] == "one-cycle"
    assert details["victim"] == "small-cnn" and details["pgd"]["step_size"] == 0.05
    assert details["selection"]["matrix_attack"].startswith("white-box PGD-10")
    matrix_row = json.loads((out / "checkpoints" / "matrix-0.json").read_text())
    assert matrix_row["attack"] == "pgd" and matrix_row["validation_images"] == 100
    assert set(results["methods"]) == {m.value for m in Method}
    assert results["methods"][Method.PGD_AT]["strengths"] == [0.3]
    table = (out / "table.md").read_text()
    assert "pgd-at" in table and "Training recipe: `fgsm-rs`" in table
    assert "white-box PGD (on the evaluated model) at ε = 0.3 |" in table
    assert "paper (Table 1" not in table


def test_audit_reports_every_attack_and_check(model_file, tmp_path, cli):
    out = tmp_path / "audit.json"
    proc = cli("audit", str(model_file), "--eps", "0.1", "--test-limit", "60",
                   "--pgd-steps", "5", "--pgd-restarts", "1", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "APGD-DLR" in proc.stdout and "worst case over all attacks" in proc.stdout
    report = json.loads(out.read_text())
    assert report["images"] == 60 and report["eps"] == 0.1
    assert set(report["steps_sweep"]) == {"10", "40", "100"}
    from advguard.io import file_sha256

    assert report["model"]["file_sha256"] == file_sha256(model_file)
    # the worst case is the images no attack fooled, from the per-image pieces saved
    shards = sorted((tmp_path / "audit.parts" / "shards").glob("*.json"))
    cols = [json.loads(s.read_text())["columns"] for s in shards]
    names = [*report["attacks"].keys() - {"AutoAttack (standard)"}, "AutoAttack Square",
             "clean"]
    robust = sum(all(c[n][i] == "1" for n in names) for c in cols for i in range(len(c["clean"])))
    assert report["worst_case_accuracy"] == robust / 60
    # a finished run is not run again: the same command answers from its pieces
    stamps = [s.stat().st_mtime_ns for s in shards]
    again = cli("audit", str(model_file), "--eps", "0.1", "--test-limit", "60",
                "--pgd-steps", "5", "--pgd-restarts", "1", "--out", str(out), "--quiet")
    assert again.returncode == 0 and again.stdout == proc.stdout
    assert [s.stat().st_mtime_ns for s in shards] == stamps
    assert_one_line_error(cli("audit", str(model_file), "--eps", "0.2", "--test-limit", "60",
                              "--out", str(out)), "holds a run of another plan")


def test_train_with_a_white_box_recipe(tmp_path, cli):
    out = tmp_path / "rs.safetensors"
    proc = cli("train", str(out), "--model", "small-cnn", "--strengths", "0.1,0.3",
                   "--recipe", "fgsm-rs", "--epochs", "1", "--train-limit", "300", "--quiet")
    assert proc.returncode == 0, proc.stderr
    from advguard.io import read_metadata

    meta = read_metadata(out)
    assert meta["recipe"] == "fgsm-rs" and meta["arch"] == "small-cnn"
    assert meta["history"][0]["epoch"] == 1
    # what a bit-for-bit retraining needs beside the options: torch and its thread count
    assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__
    assert_one_line_error(cli("train", str(out), "--recipe", "fgsm-rs", "--crafter",
                                  str(out), "--strengths", "0.1"), "--recipe fgsm only")


def test_the_installed_console_script_starts(tmp_path, model_file):
    """The ``advguard`` entry point in a fresh interpreter: classify, and fail in one line."""
    script = Path(sys.executable).with_name("advguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "advguard.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    x = _npy(tmp_path, np.zeros((2, 1, 28, 28), np.float32))
    ok = subprocess.run([*command, "predict", str(model_file), x], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 2, ok.stderr
    bad = subprocess.run([*command, "evaluate", str(tmp_path / "missing.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint not found")
    assert "Traceback" not in bad.stderr


def test_choices_on_a_held_out_validation_split(tmp_path, cli):
    """train --hold-out N leaves N training images out and records it; evaluate and audit
    --split val attack exactly those; a checkpoint trained on them cannot be 'validated'."""
    import torch

    from advguard.data import DataOptions
    from advguard.errors import DataError
    from advguard.io import read_metadata

    held = tmp_path / "held.safetensors"
    proc = cli("train", str(held), "--model", "mlp3", "--epochs", "1", "--train-limit", "2000",
               "--hold-out", "1000", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(held)["data"]["hold_out"] == 1000
    out = tmp_path / "val.json"
    proc = cli("evaluate", str(held), "--split", "val", "--test-limit", "300", "--grid", "0,0.1",
               "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["split"] == "val" and result["hold_out"] == 1000 and result["images"] == 300
    # the validation images are not among the training images, and are found again
    options = DataOptions(hold_out=1000)
    train_part, val_part = options.held_out()
    trained = options.load_training(limit=2000)
    seen = {x.numpy().tobytes() for x in trained.x}
    assert not any(x.numpy().tobytes() in seen for x in val_part.x[:300])
    assert torch.equal(DataOptions(hold_out=1000, split="val").load_evaluation(300).x,
                       val_part.x[:300])
    # slices (--test-start) tile the split: a long evaluation can run as several
    for opts_ in (DataOptions(hold_out=1000, split="val"), DataOptions()):
        whole = opts_.load_evaluation(900).x
        parts = [opts_.load_evaluation(300, start).x for start in (0, 300, 600)]
        assert torch.equal(torch.cat(parts), whole)
    assert len(DataOptions(hold_out=1000, split="val").load_evaluation(500, 800)) == 200
    with pytest.raises(DataError, match="--test-start 1000 is past the last of the 1000 val"):
        DataOptions(hold_out=1000, split="val").load_evaluation(10, 1000)
    assert len(train_part) == 59_000
    # refusals: no held-out split, a different one, --split for training
    plain = tmp_path / "plain.safetensors"
    assert cli("train", str(plain), "--model", "mlp3", "--epochs", "1", "--train-limit", "500",
               "--quiet").returncode == 0
    assert_one_line_error(cli("evaluate", str(plain), "--split", "val"),
                          "--split val needs the validation images held out")
    assert_one_line_error(cli("audit", str(held), "--split", "val", "--hold-out", "500"),
                          "trained holding out 1000 images")
    assert_one_line_error(cli("train", str(tmp_path / "x.safetensors"), "--split", "val"),
                          "--split chooses the images evaluate and audit attack")
    assert_one_line_error(cli("evaluate", str(held), "--split", "train"),
                          "split must be one of test, val")


def test_version_names_advguard_and_torch(cli):
    from advguard import __version__

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"advguard {__version__} (torch {torch.__version__})"
