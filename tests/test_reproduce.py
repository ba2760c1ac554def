"""The experiment layer as functions: the run directory's cached stages, the MAT stages and the
detection experiment's scoring, on tiny real MNIST subsets (no subprocess)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advguard.data import load_dataset
from advguard.detection import KNNBank, Preprocessing, Weighting
from advguard.errors import CheckpointError, InputError
from advguard.evaluation import eer_accuracy, keep_threshold
from advguard.io import read_json, write_json
from advguard.models import accuracy
from advguard.reproduce.detect.run import metrics, score_sets
from advguard.reproduce.detect.stages import Queries
from advguard.reproduce.mat import MatConfig
from advguard.reproduce.mat import stages as mat_stages
from advguard.reproduce.mat.methods import evaluate, method_strengths, model
from advguard.reproduce.mat.stages import Data, Mat, candidates, matrix, mssim_bound, selection
from advguard.reproduce.rundir import RunDir, open_run
from advguard.strengths import HAND_PICKED, RANDOM_WALK
from advguard.training import Method

# --- the run directory ------------------------------------------------------------------------


def test_a_cached_stage_is_computed_once_then_read_back(tmp_path):
    run = RunDir(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    run.path("old.state.pt").parent.mkdir(parents=True)
    run.path("old.state.pt").write_bytes(b"state")
    assert run.json("stage", compute) == {"value": 1}
    assert run.json("stage", compute) == {"value": 1} and len(calls) == 1
    # a stored result that no longer fits is computed again
    assert run.json("stage", compute, valid=lambda v: v["value"] > 1) == {"value": 2}
    assert read_json(run.path("stage.json")) == {"value": 2}
    # a finished stage removes the training state it resumed from
    run.cached("model.json", compute, write_json, read_json, cleanup=["old.state.pt"])
    assert not run.path("old.state.pt").exists()


def test_a_failed_stage_leaves_nothing_behind(tmp_path):
    run = RunDir(tmp_path)

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run.json("stage", boom)
    assert not run.path("stage.json").exists()


def test_a_run_directory_refuses_another_configuration_once_it_holds_work(tmp_path):
    with open_run(MatConfig(strengths=(0.1, 0.3)), tmp_path) as (cfg, run):
        assert cfg.single_strength == 0.1 and cfg.setting.value == "transfer"
    # nothing stored yet (a run that failed at once): a corrected command simply replaces it
    with open_run(MatConfig(strengths=(0.1, 0.2)), tmp_path) as (cfg, run):
        run.json("stage", lambda: {"done": True})
    with open_run(MatConfig(strengths=(0.1, 0.2)), tmp_path):  # the same one resumes
        pass
    with pytest.raises(CheckpointError, match=r"different configuration \(epochs\)"):
        with open_run(MatConfig(strengths=(0.1, 0.2), epochs=3), tmp_path):
            pass


def test_a_run_directory_is_locked_while_a_run_uses_it(tmp_path):
    with open_run(MatConfig(strengths=(0.1,)), tmp_path):
        with pytest.raises(InputError, match=r"is in use by pid \d+"):
            with open_run(MatConfig(strengths=(0.1,)), tmp_path):
                pass
    with open_run(MatConfig(strengths=(0.1,)), tmp_path):  # released when the run ends
        pass


# --- the MAT stages ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data() -> Data:
    train = load_dataset("mnist", "train", limit=1200)
    test = load_dataset("mnist", "test", limit=200)
    return Data(train.subset(slice(0, 1000)), train.subset(slice(1000, 1200)), test)


def _mat(tmp_path, data: Data, **overrides) -> Mat:
    config = MatConfig(**{"grid": (0.0, 0.1, 0.3), "epochs": 1, "crafter_epochs": 1,
                          "matrix_epochs": 1, "walks": 50, "pgd_steps": 2, "pgd_limit": 50,
                          "autoattack_limit": 20, **overrides})
    cfg = config.resolve()
    run = RunDir(tmp_path)
    run.pin(cfg)
    return Mat(cfg, run, data, progress=False)


def test_hand_picked_strengths_skip_the_selection(tmp_path, tiny_data):
    m = _mat(tmp_path, tiny_data, strengths=(0.1, 0.3))
    sel = selection(m)
    assert sel.source == HAND_PICKED and sel.matrix is None
    assert method_strengths(m, Method.ORIGINAL) == []
    assert method_strengths(m, Method.SINGLE) == [0.1]
    assert method_strengths(m, Method.MIXED) == method_strengths(m, Method.PARALLEL) == [0.1, 0.3]
    assert method_strengths(m, Method.PGD_AT) == [0.3]
    assert not m.run.path("selection.json").exists()


def test_mssim_bound_and_matrix_rows_are_cached(tmp_path, tiny_data, monkeypatch):
    m = _mat(tmp_path, tiny_data, tau=0.0)
    bound = mssim_bound(m)
    assert bound.mssim[0] == pytest.approx(1.0)
    assert bound.mssim[0] > bound.mssim[1] > bound.mssim[2]
    assert bound.bound == 0.3 and candidates(m) == [0.1, 0.3]
    if m.cfg.transfer:  # the crafting model's directions: cached on disk, read memory-mapped
        assert np.load(m.run.path("directions-val.npy"), mmap_mode="r").dtype == np.int8
    A = matrix(m)
    assert len(A) == 2 and all(len(row) == 2 for row in A)
    assert all(0.0 <= a <= 1.0 for row in A for a in row)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage trained again")

    monkeypatch.setattr(mat_stages, "train", no_training)
    assert matrix(m) == A
    sel = selection(m)
    assert sel.source == RANDOM_WALK and sel.matrix == A and sel.candidates == [0.1, 0.3]
    assert sel.parallel_selection is not None
    assert sel.parallel_selection.exact.G >= sel.parallel_selection.walk.G - 1e-12
    assert sel.parallel == sel.parallel_selection.walk.strengths


def test_a_methods_evaluation_starts_at_its_clean_accuracy(tmp_path, tiny_data):
    m = _mat(tmp_path, tiny_data, strengths=(0.1, 0.3))
    result = evaluate(m, Method.ORIGINAL)
    net, _ = model(m, Method.ORIGINAL)
    clean = accuracy(net, tiny_data.test.x, tiny_data.test.y)
    assert result.curve[0] == pytest.approx(clean)
    assert set(result.curves) == {"transfer-fgsm", "white-box-fgsm", "white-box-pgd"}
    assert result.curves["transfer-fgsm"][0] == result.curves["white-box-fgsm"][0] == clean
    assert result.curves["white-box-pgd"][0] == pytest.approx(  # PGD on the first 50 only
        accuracy(net, tiny_data.test.x[:50], tiny_data.test.y[:50]))
    assert all(len(curve) == 3 for curve in result.curves.values())
    assert result.mean == pytest.approx(sum(result.curve) / 3)
    assert evaluate(m, Method.ORIGINAL) == result  # read back, not recomputed
    aa = result.autoattack  # the column at the top of the grid, first 20 test images
    assert aa["eps"] == 0.3 and aa["images"] == 20
    assert aa["clean_accuracy"] == pytest.approx(
        accuracy(net, tiny_data.test.x[:20], tiny_data.test.y[:20]))
    assert aa["robust_accuracy"] < aa["clean_accuracy"]  # a clean MLP at 0.3 falls
    off = _mat(tmp_path / "off", tiny_data, strengths=(0.1, 0.3), autoattack_limit=0)
    assert evaluate(off, Method.ORIGINAL).autoattack is None
    chosen = _mat(tmp_path / "eps", tiny_data, strengths=(0.1, 0.3), autoattack_eps=0.1)
    assert chosen.cfg.autoattack_eps == 0.1


# --- the detection experiment's scoring -------------------------------------------------------


def test_one_search_scores_every_weighting_as_separate_detectors_do():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((400, 12)).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    q = Queries(rng.standard_normal((30, 12)).astype(np.float32), rng.integers(0, 4, 30),
                rng.integers(0, 4, 30))

    class D:  # the two fields score_sets reads
        class cfg:
            k, seed = 25, 0

        class train_set:
            y = torch.from_numpy(labels)

    scores, bank_mb = score_sets(D, torch.from_numpy(bank), {"q": q})  # type: ignore[arg-type]
    for pre in Preprocessing:
        assert bank_mb[pre.value] > 0
        for w in Weighting:
            knn = KNNBank(k=25, weighting=w, preprocessing=pre).fit(bank, labels)
            np.testing.assert_allclose(scores[pre.value][w.value]["q"],
                                       knn.scores(q.features, q.predicted), atol=1e-6)


def test_metrics_of_a_table_entry():
    rng = np.random.default_rng(1)
    s = {"authentic": rng.uniform(0.4, 1, 200), "calibration": rng.uniform(0.4, 1, 300),
         "lbfgs": rng.uniform(0, 0.6, 50), "fgsm": rng.uniform(0, 0.8, 80),
         "errors": rng.uniform(0, 1, 20)}
    out = metrics(s, ["lbfgs", "fgsm", "aggregated", "errors", "pgd"], keep=0.98)
    assert out["threshold"] == keep_threshold(s["calibration"], 0.98)
    agg = np.concatenate([s["lbfgs"], s["fgsm"]])
    assert out["aggregated"]["n"] == 130
    assert out["aggregated"]["eer_accuracy"] == eer_accuracy(s["authentic"], agg)
    assert out["fgsm"]["filtered"] == pytest.approx((s["fgsm"] < out["threshold"]).mean())
    assert "pgd" not in out  # a negative set the run did not make is left out, not zeroed


def test_detection_models_train_with_the_victim_options():
    from advguard.reproduce.detect.config import DetectConfig
    from advguard.training import Schedule, TrainConfig

    plain = DetectConfig(epochs=3, lr=2e-3).resolve().train_config()
    # the default is the paper-era training: a run made before these options resumes
    assert plain == TrainConfig(epochs=3, batch_size=128, lr=2e-3, seed=0, device="cpu")
    strong = DetectConfig(dataset="cifar10", model="resnet-s", schedule="one-cycle",
                          augment=True, label_smoothing=0.1,
                          channels_last=True).resolve().train_config()
    assert strong.schedule is Schedule.ONE_CYCLE
    assert (strong.augment, strong.label_smoothing, strong.channels_last) == (True, 0.1, True)


def test_a_matrix_row_is_its_model_s_validation_accuracy_at_every_candidate(tmp_path, tiny_data,
                                                                           monkeypatch,
                                                                           trained_mlp):
    """A[i][j] is what SPEC A5 says: the accuracy of row i's model on the validation images
    under the run's attack at candidate j. Training made a no-op, every row's model is the
    seeded untrained victim, so each row must equal that model's curve computed here through
    the public API — on the validation split (not the test images), at the candidates, in the
    run's setting (white-box FGSM here). "Training" copies a trained MLP into the victim,
    so that the validation and test curves differ."""
    from types import SimpleNamespace

    from advguard.attacks import fgsm_directions
    from advguard.evaluation import curve_from_directions
    from advguard.models import build_model

    def same(model):
        a, b = model.state_dict(), trained_mlp.state_dict()
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    def trained(model, *args, **kwargs):
        if same(model):  # the victim (not the crafting model)
            model.load_state_dict(trained_mlp.state_dict())
        return SimpleNamespace(seconds=0.0, history=[])

    monkeypatch.setattr(mat_stages, "train", trained)
    m = _mat(tmp_path, tiny_data, tau=0.0, setting="white-box", matrix_attack="fgsm")
    cands = candidates(m)
    victim = build_model(m.cfg.victim, m.cfg.dataset)
    assert same(victim)
    victim.load_state_dict(trained_mlp.state_dict())
    val = tiny_data.val
    want = curve_from_directions(victim, val.x, val.y, fgsm_directions(victim, val.x, val.y),
                                 cands)
    A = matrix(m)
    assert len(A) == len(cands) >= 2
    for row in A:
        assert row == pytest.approx(want, abs=1e-9)
    test = tiny_data.test
    on_test = curve_from_directions(victim, test.x, test.y,
                                    fgsm_directions(victim, test.x, test.y), cands)
    assert on_test != pytest.approx(want, abs=1e-9)  # the check can tell the two splits apart

