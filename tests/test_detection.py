from __future__ import annotations

import numpy as np
import pytest
import torch

from advguard.attacks import LBFGS, fgsm
from advguard.detection import (
    FeatureIndex,
    KNNBank,
    KNNDetector,
    Preprocessor,
    class_scores,
    default_layer,
    extract_features,
)
from advguard.errors import CheckpointError, InputError
from advguard.evaluation import auc, eer, eer_accuracy, operating_point, roc, threshold_sweep
from advguard.io import load_tensors, save_tensors
from advguard.models import accuracy, build_model


def brute_force_scores(bank, labels, queries, predicted, k, weighting):
    """SPEC B3 written out with numpy: sort by L2 distance, weight, share of the class."""
    out = []
    for q, c in zip(queries, predicted, strict=True):
        d = np.sqrt(((bank.astype(np.float64) - q) ** 2).sum(axis=1))
        order = np.argsort(d, kind="stable")[:k]
        dist, lab = d[order], labels[order]
        if weighting == "knn":
            w = np.ones(k)
        elif weighting == "wknn":
            w = 1.0 / np.arange(1, k + 1)
        else:
            w = 1.0 / dist ** 2 if (dist > 0).all() else (dist == 0).astype(float)
        out.append((w * (lab == c)).sum() / w.sum())
    return np.array(out)


@pytest.mark.parametrize("weighting", ["knn", "wknn", "dwknn"])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_scores_equal_brute_force_on_random_features(weighting, k):
    rng = np.random.default_rng(k)
    bank = rng.standard_normal((400, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 400)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    predicted = rng.integers(0, 5, 30)
    det = KNNBank(k=k, weighting=weighting, preprocessing="none").fit(bank, labels)
    got = det.scores(queries, predicted)
    want = brute_force_scores(bank, labels, queries, predicted, k, weighting)
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("weighting", ["knn", "wknn", "dwknn"])
def test_ties_and_zero_distance(weighting):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    bank = np.concatenate([base, base, base])  # every point three times: tied distances
    labels = np.tile(rng.integers(0, 3, 50), 3)
    queries = np.concatenate([base[:5], rng.standard_normal((5, 8)).astype(np.float32)])
    predicted = np.concatenate([labels[:5], rng.integers(0, 3, 5)])
    det = KNNBank(k=9, weighting=weighting, preprocessing="none").fit(bank, labels)
    got = det.scores(queries, predicted)
    assert np.allclose(got, brute_force_scores(bank, labels, queries, predicted, 9, weighting),
                       atol=1e-5)
    if weighting == "dwknn":  # a query on a bank point: its zero-distance copies alone vote
        assert np.allclose(got[:5], 1.0)
    assert np.isfinite(got).all() and ((got >= 0) & (got <= 1)).all()


def test_faiss_missing_neighbours_do_not_vote():
    d2 = np.array([[0.5, 1.0, 3.4e38]])
    labels = np.array([[1, 2, -1]])
    assert class_scores(d2, labels, np.array([1]), "knn")[0] == pytest.approx(0.5)


def test_preprocessing_matches_scikit_learn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 40)).astype(np.float32) @ rng.standard_normal((40, 40)).astype(
        np.float32)
    pre = Preprocessor("pca-whiten", max_components=20).fit(f)
    want = PCA(20, whiten=True, random_state=0).fit(f).transform(f)
    assert np.allclose(pre.transform(f), want, atol=1e-3)
    z = pre.transform(f)
    assert np.allclose(z.std(axis=0, ddof=1), 1.0, atol=1e-2)
    unit = Preprocessor("l2").fit(f).transform(f)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InputError, match="unknown pre-processing"):
        Preprocessor("zca")


def test_ivf_index_approximates_flat():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((5000, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 5000)
    flat = FeatureIndex.build(bank, labels)
    ivf = FeatureIndex.build(bank, labels, kind="ivf", nlist=32, nprobe=32)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    d_flat, _ = flat.search(q, 10)
    d_ivf, _ = ivf.search(q, 10)
    assert np.allclose(d_flat, d_ivf, atol=1e-4)  # nprobe = nlist searches every cell


def test_ivfpq_compresses_the_bank_and_keeps_most_neighbours(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 16)).astype(np.float32) * 4
    bank = (centres[rng.integers(0, 20, 20000)] + rng.standard_normal((20000, 16))
            ).astype(np.float32)
    labels = rng.integers(0, 10, 20000)
    q = bank[:200] + 0.1 * rng.standard_normal((200, 16)).astype(np.float32)
    exact = FeatureIndex.build(bank, labels).search_ids(q, 20)
    pq = FeatureIndex.build(bank, labels, kind="ivfpq", nlist=64, nprobe=8, pq_m=8)
    ivf = FeatureIndex.build(bank, labels, kind="ivf", nlist=64, nprobe=8)
    recall = {name: np.mean([len(set(a) & set(b)) / 20 for a, b in
                             zip(exact, idx.search_ids(q, 20), strict=True)])
              for name, idx in (("ivf", ivf), ("ivfpq", pq))}
    assert recall["ivf"] > 0.9 and recall["ivfpq"] > 0.5
    own = {name: idx.nbytes - labels.astype(np.int64).nbytes  # FAISS's part
           for name, idx in (("flat", FeatureIndex.build(bank, labels)), ("ivf", ivf),
                             ("ivfpq", pq))}
    assert own["ivfpq"] < own["flat"] / 3 < own["ivf"]  # 8 + 8 bytes a vector instead of 64
    det = KNNBank(k=20, preprocessing="none", index="ivfpq", nlist=64, pq_m=8).fit(bank, labels)
    save_tensors(tmp_path / "pq.safetensors", det.state(), {})
    back = KNNBank(k=20, preprocessing="none", index="ivfpq").load_state(
        load_tensors(tmp_path / "pq.safetensors")[0])
    assert back.index_.kind == "ivfpq" and len(back.index_) == 20000
    np.testing.assert_array_equal(back.scores(q, labels[:200]), det.scores(q, labels[:200]))


@pytest.mark.parametrize("pre", ["none", "l2"])
def test_a_bank_added_in_chunks_equals_one_added_at_once(pre):
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((3000, 12)).astype(np.float32)
    labels = rng.integers(0, 4, 3000)
    q = rng.standard_normal((50, 12)).astype(np.float32)
    whole = KNNBank(k=30, preprocessing=pre).fit(bank, labels)
    chunks = ((bank[s:s + 700], labels[s:s + 700]) for s in range(0, 3000, 700))
    parts = KNNBank(k=30, preprocessing=pre, fit_sample=1000).fit_chunks(chunks)
    assert len(parts.index_) == 3000
    np.testing.assert_allclose(parts.scores(q, labels[:50]), whole.scores(q, labels[:50]),
                               atol=1e-9)


# --- metrics ---------------------------------------------------------------------------------

def test_eer_accuracy_agrees_with_a_brute_force_roc():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.0, 500), rng.normal(-0.5, 1.0, 300)
    best = None
    for t in np.unique(np.r_[pos, neg]):
        fpr, fnr = (neg >= t).mean(), (pos < t).mean()
        if best is None or abs(fpr - fnr) < best[0]:
            best = (abs(fpr - fnr), (fpr + fnr) / 2)
    assert eer_accuracy(pos, neg) == pytest.approx(1 - best[1], abs=1e-9)
    fpr, tpr, _ = roc(pos, neg)
    assert auc(pos, neg) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-9)
    assert eer(np.array([1.0, 2.0]), np.array([0.0, 0.5]))[0] == 0.0


def test_threshold_sweep_and_operating_point():
    pos = np.linspace(0.5, 1.0, 100)
    neg = np.linspace(0.0, 0.6, 50)
    tpr, fpr = threshold_sweep(pos, neg, np.array([0.0, 0.55, 2.0]))
    assert tpr.tolist()[0] == 1.0 and tpr[-1] == 0.0 and fpr[0] == 1.0
    op = operating_point(pos, neg, keep=0.98)
    assert op.keep >= 0.98 and 0 < op.filtered <= 1
    assert op.filtered == pytest.approx((neg < op.threshold).mean())


# --- the detector on a real model ------------------------------------------------------------

def test_default_layers():
    assert default_layer(build_model("mlp3", "mnist")).name == "6"  # input of the last Linear
    assert default_layer(build_model("mlp3", "mnist")).inputs
    lenet = default_layer(build_model("lenet5", "mnist"))
    assert lenet.name == "6" and not lenet.inputs  # the max-pool closing the last conv block


def test_features_are_pooled_and_predictions_match(trained_lenet, mnist_test):
    x = mnist_test.x[:50]
    features, predicted = extract_features(trained_lenet, x)
    assert features.shape == (50, 16)  # 16 channels, average-pooled
    assert torch.equal(predicted, trained_lenet(x).argmax(1))


def test_detector_flags_adversarial_inputs(trained_lenet, mnist_train, mnist_test):
    det = KNNDetector(k=50, weighting="dwknn", preprocessing="l2").fit(
        trained_lenet, mnist_train.x, mnist_train.y,
        x_calibration=mnist_train.x[:500], y_calibration=mnist_train.y[:500])
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    pred, scores = det.inspect(x)
    authentic = scores[pred == y.numpy()]
    adv = fgsm(trained_lenet, x, y, 0.25)
    adv_pred, adv_scores = det.inspect(adv)
    fooled = adv_scores[adv_pred != y.numpy()]
    assert len(fooled) > 50
    assert auc(authentic, fooled) > 0.8
    flags = det.predict(adv)
    assert set(np.unique(flags)) <= {-1, 1}
    assert (det.decision_function(x) == det.score_samples(x) - det.offset_).all()


def test_detector_round_trip_and_errors(trained_lenet, mnist_train, mnist_test, tmp_path):
    det = KNNDetector(k=20, preprocessing="pca-whiten").fit(
        trained_lenet, mnist_train.x[:1000], mnist_train.y[:1000],
        x_calibration=mnist_train.x[1000:1300], y_calibration=mnist_train.y[1000:1300])
    path = det.save(tmp_path / "det.safetensors")
    loaded = KNNDetector.load(path, trained_lenet)
    x = mnist_test.x[:40]
    assert np.allclose(det.score_samples(x), loaded.score_samples(x))
    assert loaded.offset_ == det.offset_
    with pytest.raises(InputError, match="not fitted"):
        KNNDetector().score_samples(x)
    with pytest.raises(InputError, match="no threshold"):
        KNNDetector(k=5).fit(trained_lenet, mnist_train.x[:100], mnist_train.y[:100]
                             ).decision_function(x)
    with pytest.raises(InputError, match="must lie in"):
        det.score_samples(x * 3)
    with pytest.raises(InputError, match="no layer 'fc9'"):
        KNNDetector(layers=("fc9",)).fit(trained_lenet, x, mnist_test.y[:40])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        KNNDetector.load(tmp_path / "bad.safetensors")


def test_inputs_unlike_any_training_image_are_flagged(trained_lenet, mnist_train, mnist_test,
                                                      tmp_path):
    """The bank distance (normalised features, nearest training image) limit, fitted on the
    held-out split at familiar_keep, flags noise and blanks, keeps test digits, and survives
    save/load."""
    bank = mnist_train.x[:2000], mnist_train.y[:2000]
    held = mnist_train.x[2000:2500], mnist_train.y[2000:2500]
    plain = KNNDetector(k=20).fit(trained_lenet, *bank)
    plain.set_threshold(*held)
    assert plain.verdicts(mnist_test.x[:5]).unlike is None  # no held-out fit: no such verdict
    det = KNNDetector(k=20, familiar_keep=0.99).fit(trained_lenet, *bank, x_calibration=held[0],
                                                    y_calibration=held[1])
    held_out = det.bank_distance(det.features(held[0])[0])
    assert det.distance_limit_ == pytest.approx(np.quantile(held_out, 0.99))
    assert det.familiar_kept_ == pytest.approx((held_out <= det.distance_limit_).mean())
    gen = torch.Generator().manual_seed(0)
    odd = torch.cat([torch.rand(20, 1, 28, 28, generator=gen), torch.ones(2, 1, 28, 28),
                     torch.zeros(2, 1, 28, 28)])
    loaded = KNNDetector.load(det.save(tmp_path / "d.safetensors"), trained_lenet)
    assert loaded.distance_limit_ == det.distance_limit_
    for d in (det, loaded):
        v = d.verdicts(odd)
        assert v.unlike is not None and v.unlike.all() and not v.trusted.any()
        clean = d.verdicts(mnist_test.x[:300])
        assert clean.unlike is not None and clean.unlike.mean() < 0.03
        assert (clean.trusted <= (clean.scores >= clean.threshold)).all()
    assert np.allclose(det.bank_distance(det.features(odd)[0]),
                       loaded.bank_distance(loaded.features(odd)[0]))


def test_lbfgs_reaches_its_targets_with_small_perturbations(trained_mlp, mnist_test):
    x, y = mnist_test.x[:24], mnist_test.y[:24]
    keep = trained_mlp(x).argmax(1) == y
    x, y = x[keep], y[keep]
    report = LBFGS(c_grid=(0.1, 1.0, 10.0), binary_steps=2, max_iter=30).run(trained_mlp, x, y)
    assert (report.target != y).all()
    assert report.success.float().mean() > 0.8
    ok = report.success
    assert (trained_mlp(report.x_adv[ok]).argmax(1) == report.target[ok]).all()
    assert report.x_adv.min() >= 0 and report.x_adv.max() <= 1
    l2 = (report.x_adv - x).flatten(1).norm(dim=1)
    assert torch.allclose(l2[ok], report.l2[ok], atol=1e-4)
    assert torch.equal(report.x_adv[~ok], x[~ok])
    assert accuracy(trained_mlp, report.x_adv, y) < 0.2


def test_files_and_guard_folders_of_the_one_layer_knn_before_the_one_family_still_load(
        trained_lenet, mnist_train, mnist_test, tmp_path):
    """A kNN detector file written before every detector was one family (tensors unprefixed,
    the layer as ``layer``, the bank-distance limit at the top) loads with the same scores and
    verdicts; so does a guard.json with the kNN's options as fields of their own."""
    from advguard.serve.guard import GuardConfig

    det = KNNDetector(k=20).fit(trained_lenet, mnist_train.x[:1500], mnist_train.y[:1500],
                                x_calibration=mnist_train.x[1500:1800],
                                y_calibration=mnist_train.y[1500:1800])
    tensors, _ = load_tensors(det.save(tmp_path / "new.safetensors"))
    key = det.fitted_keys_[0]
    params = {"k": 20, "weighting": "dwknn", "preprocessing": "pca-whiten", "layer": None,
              "index": "flat", "keep": det.keep, "batch_size": 1000, "device": "cpu", "seed": 0,
              "nlist": 1024, "nprobe": 16, "pq_m": None, "chunk_size": 10_000,
              "fit_sample": 100_000}
    old = save_tensors(tmp_path / "old.safetensors",
                       {n[len(key) + 1:]: t for n, t in tensors.items()},
                       {"detector": "knn", "params": params, "offset": det.offset_,
                        "distance_limit": det.distance_limit_,
                        "layer": det.layers_[0].__dict__})
    back = KNNDetector.load(old, trained_lenet)
    x = torch.cat([mnist_test.x[:100], torch.rand(5, 1, 28, 28)])
    a, b = det.verdicts(x), back.verdicts(x)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.trusted, b.trusted)
    assert b.unlike is not None and np.array_equal(a.unlike, b.unlike) and b.unlike[-5:].all()
    config = GuardConfig.from_json({
        "dataset": "mnist", "source": "m", "k": 1000, "weighting": "dwknn",
        "preprocessing": "pca-whiten", "keep": 0.98, "threshold": 0.5, "bank_images": 1,
        "calibration_images": 1, "calibration_kept": 0.98, "fitted_at": "t", "advguard": "0.1",
        "distance_limit": 0.02, "familiar_keep": 0.995, "detector": "knn"})
    assert config.settings == {"k": 1000, "weighting": "dwknn", "preprocessing": "pca-whiten"}
    assert config.fitted == {"distance_limit": 0.02, "familiar_kept": 0.995}
