"""Every registered detector through the one interface, as a table: it fits (in memory and
streamed, alike), scores, calibrates to its keep rate, round-trips through its file; and the
reference checks: Mahalanobis against pytorch-ood's, the bank distance against pytorch-ood's KNN,
Deep kNN's p-values against a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from advguard.attacks import FGSM, PGD
from advguard.detection import (
    DETECTORS,
    DeepKNN,
    KNNBank,
    Mahalanobis,
    build_detector,
    load_detector,
)
from advguard.errors import InputError
from advguard.evaluation import auc

SETTINGS = {  # small banks: small k
    "knn": {"k": 50, "preprocessing": "l2"},
    "knn-layers": {"k": 50, "preprocessing": "l2"},
    "dknn": {"k": 25},
    "mahalanobis": {},
    "energy": {},
}


def test_the_table_covers_every_registered_detector():
    assert set(SETTINGS) == set(DETECTORS)


@pytest.fixture(scope="module")
def split(mnist_train, mnist_test):
    """Bank, calibration split held out of it, queries."""
    x, y = mnist_train.x, mnist_train.y
    return (x[:2400], y[:2400]), (x[2400:], y[2400:]), (mnist_test.x[:300], mnist_test.y[:300])


@pytest.fixture(scope="module")
def fitted(trained_lenet, split):
    (xb, yb), (xc, yc), _ = split
    return {name: build_detector(name, **SETTINGS[name], chunk_size=700).fit(
        trained_lenet, xb, yb, x_calibration=xc, y_calibration=yc) for name in DETECTORS}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_fits_scores_and_calibrates(name, fitted, split):
    det = fitted[name]
    _, (xc, yc), (xq, yq) = split
    predicted, scores = det.inspect(xq)
    assert scores.shape == (len(xq),) and np.isfinite(scores).all()
    assert np.array_equal(det.score_samples(xq), scores)
    # the threshold keeps the share asked of the correctly classified calibration images
    p_cal, s_cal = det.inspect(xc)
    right = p_cal == yc.numpy()
    kept = (s_cal[right] >= det.offset_).mean()
    assert det.keep - 1e-9 <= kept <= det.keep + 0.02
    assert set(np.unique(det.predict(xq))) <= {-1, 1}
    v = det.verdicts(xq[:10])
    assert np.array_equal(v.trusted, det.predict(xq[:10]) == 1)
    # authentic images score above the model's own errors and FGSM images that fool it
    adv = FGSM()(det.model_, xq, yq, 0.2)
    p_adv, s_adv = det.inspect(adv)
    ok = predicted == yq.numpy()
    fooled = ok & (p_adv != yq.numpy())
    assert fooled.sum() > 30
    assert auc(scores[ok], s_adv[fooled]) > 0.6, name


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_round_trips_through_its_file(name, fitted, split, trained_lenet, tmp_path):
    det = fitted[name]
    xq = split[2][0]
    path = det.save(tmp_path / f"{name}.safetensors")
    back = load_detector(path, trained_lenet)
    assert type(back) is type(det)
    assert back.offset_ == det.offset_
    assert np.allclose(back.score_samples(xq), det.score_samples(xq), rtol=1e-6, atol=1e-9)
    with pytest.raises(InputError, match="no model"):
        load_detector(path).score_samples(xq)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_streamed_fit_equals_in_memory(name, fitted, split, trained_lenet):
    (xb, yb), (xc, yc), (xq, _) = split
    loader = DataLoader(TensorDataset(xb, yb), batch_size=100)
    streamed = build_detector(name, **SETTINGS[name], chunk_size=500, batch_size=100).fit(
        trained_lenet, loader, x_calibration=xc, y_calibration=yc)
    assert np.allclose(streamed.score_samples(xq), fitted[name].score_samples(xq),
                       rtol=1e-4, atol=1e-5)
    predicted, scores, labels = streamed.inspect_dataset(TensorDataset(xq, split[2][1]))
    assert np.allclose(scores, fitted[name].score_samples(xq), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def targeted(trained_lenet, split):
    """100 queries, random target classes, and plain targeted PGD's images (one model for
    every detector, so crafted once)."""
    from advguard.attacks import random_targets

    xq, yq = split[2][0][:100], split[2][1][:100]
    t = random_targets(yq, 10, 0)
    return xq, t, PGD(steps=20, targeted=True, random_start=False)(trained_lenet, xq, t, 0.3)


@pytest.mark.parametrize(("name", "surrogate"), [(n, s) for n in DETECTORS
                                                  for s in DETECTORS[n].surrogates])
def test_each_adaptive_attack_passes_its_detector_at_least_as_often(name, surrogate, fitted,
                                                                     targeted):
    """The attack made for a detector (same ε, same steps, targeted toward the same classes),
    with each of its surrogates, gets its fooling images trusted at the operating point at
    least as often as plain targeted PGD; on Mahalanobis, which catches every plain PGD image
    of this model, it passes most."""
    det = fitted[name]
    xq, t, plain_adv = targeted

    def passed(adv: torch.Tensor) -> tuple[float, float]:
        predicted, scores = det.inspect(adv)
        hit = predicted == t.numpy()
        return hit.mean(), (hit & (scores >= det.offset_)).mean()

    hit_plain, plain = passed(plain_adv)
    hit_adaptive, adaptive = passed(PGD(steps=20, targeted=True, random_start=False,
                                        loss=det.adaptive_loss(0.1, surrogate))(
        det.model_, xq, t, 0.3))
    assert hit_plain > 0.5 and hit_adaptive > 0.5
    assert adaptive >= plain - 0.03
    if name == "mahalanobis":
        assert plain < 0.1 and adaptive > 0.5


def test_mahalanobis_agrees_with_pytorch_ood():
    """One layer: pytorch-ood's outlier score is ½·min_c d² with the covariance *summed* (not
    divided by N, its documented choice), so ours (−min_c d², covariance a mean, as Lee et al.'s
    code via scikit-learn) is −2N times theirs."""
    from pytorch_ood.detector import Mahalanobis as OodMahalanobis

    gen = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 150)
    features = gen.normal(size=(600, 12)) + labels[:, None] * 0.7
    queries = gen.normal(size=(50, 12)) * 1.5
    ours = Mahalanobis(ridge=0.0).fit_features({"f": features.astype(np.float32)}, labels)
    theirs = OodMahalanobis(None).fit_features(torch.tensor(features, dtype=torch.float32),
                                               torch.tensor(labels))
    s_ours = ours.layer_scores({"f": queries.astype(np.float32)})[:, 0]
    s_theirs = theirs.predict_features(torch.tensor(queries, dtype=torch.float32)).numpy()
    assert np.allclose(s_ours, -2 * len(features) * s_theirs, rtol=1e-3)


def test_bank_distance_agrees_with_pytorch_ood_knn():
    """The kNN detector's bank distance is Sun et al.'s: the (squared) distance of normalised
    features to the nearest normalised training feature — pytorch-ood's ``KNN`` with k = 1."""
    from pytorch_ood.detector import KNN as OodKNN

    gen = np.random.default_rng(1)
    bank = gen.normal(size=(500, 16)).astype(np.float32)
    labels = gen.integers(0, 5, 500)
    queries = gen.normal(size=(40, 16)).astype(np.float32) * 2
    det = KNNBank(k=5, preprocessing="none", familiar=True).fit(bank, labels)
    theirs = OodKNN(None, k=1).fit_features(torch.from_numpy(bank), torch.from_numpy(labels))
    assert np.allclose(np.sqrt(det.distance(queries)),
                       theirs.predict_features(torch.from_numpy(queries)).numpy(), atol=1e-4)


def test_deep_knn_p_values_equal_brute_force():
    gen = np.random.default_rng(2)
    classes, k = 3, 7
    bank = {"a": gen.normal(size=(120, 5)), "b": gen.normal(size=(120, 8))}
    labels = gen.integers(0, classes, 120)
    cal = {"a": gen.normal(size=(40, 5)), "b": gen.normal(size=(40, 8))}
    cal_labels = gen.integers(0, classes, 40)
    queries = {"a": gen.normal(size=(25, 5)), "b": gen.normal(size=(25, 8))}
    det = DeepKNN(k=k).fit_features({n: f.astype(np.float32) for n, f in bank.items()}, labels)
    det.fit_held_out({n: f.astype(np.float32) for n, f in cal.items()},
                     np.eye(classes)[cal_labels], cal_labels)  # logits of the true classes

    def alpha(feats: dict, j: int, i: int) -> int:
        total = 0
        for n, f in feats.items():
            u = f[i] / np.linalg.norm(f[i])
            b = bank[n] / np.linalg.norm(bank[n], axis=1, keepdims=True)
            nearest = np.argsort(((b - u) ** 2).sum(1), kind="stable")[:k]
            total += int((labels[nearest] != j).sum())
        return total

    a = np.array([alpha(cal, int(cal_labels[i]), i) for i in range(40)])
    brute = np.array([[(a >= alpha(queries, j, i)).mean() for j in range(classes)]
                      for i in range(25)])
    p = det.p_values({n: f.astype(np.float32) for n, f in queries.items()})
    assert np.allclose(p, brute)
    predicted = gen.integers(0, classes, 25)
    assert np.allclose(det.score_features({n: f.astype(np.float32) for n, f in queries.items()},
                                          np.eye(classes)[predicted]),
                       brute[np.arange(25), predicted])


def test_unknown_detector_and_unfitted_use_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown detector 'lid'"):
        build_detector("lid")
    with pytest.raises(InputError, match="not fitted"):
        Mahalanobis().save(tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="not calibrated"):
        DeepKNN(k=2).fit_features({"a": np.eye(4, dtype=np.float32)}, np.arange(4)).p_values(
            {"a": np.eye(4, dtype=np.float32)})


def test_whitening_drops_components_without_variance():
    """Dead ReLU units give the bank directions of zero variance; whitening them would divide by
    ~0 and let them decide every distance (and the adaptive attack's loss became inf)."""
    from advguard.detection import Preprocessor

    gen = np.random.default_rng(3)
    bank = np.concatenate([gen.normal(size=(400, 5)), np.zeros((400, 3))], axis=1)
    pre = Preprocessor("pca-whiten").fit(bank.astype(np.float32))
    assert pre.components_.shape == (5, 8)
    query = np.ones((2, 8), np.float32)  # the dead units fire
    z = pre.transform(query)
    assert np.isfinite(z).all() and np.abs(z).max() < 100
    zt = pre.transform_tensor(torch.from_numpy(query))
    assert torch.allclose(zt, torch.from_numpy(z), atol=1e-5)


def test_soft_neighbours_counts_what_the_vote_counts():
    """Sitawarin & Wagner's surrogate on two clusters: at a class-0 point with target class 1
    every guide is outside the neighbourhood and every other-class neighbour inside, so the soft
    count is near 2k; at a class-1 point it is a small fraction of that; between them its
    gradient points toward class 1; the radius is the mean distance to the k-th other entry."""
    from torch import nn

    from advguard.detection.adaptive import SoftNeighbours, neighbourhood_radius
    from advguard.detection.features import LayerSpec

    gen = torch.Generator().manual_seed(0)
    bank = torch.cat([torch.randn(40, 2, generator=gen) * 0.3,
                      torch.randn(40, 2, generator=gen) * 0.3 + torch.tensor([5.0, 0.0])])
    labels = np.repeat([0, 1], 40)
    d = torch.cdist(bank, bank).sort(1).values[:, 5]  # column 0 is the entry itself
    assert neighbourhood_radius(bank, 5) == pytest.approx(float(d.mean()), rel=1e-5)

    model = nn.Sequential(nn.Identity(), nn.Linear(2, 2))  # features: the input itself
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()  # CE = log 2 everywhere: the loss is the soft count + constant
    loss = SoftNeighbours([LayerSpec("0")], {"0": (bank.numpy(), labels)},
                          {"0": lambda f: f}, k=5)
    target = torch.tensor([1])

    def count(point: list[float]) -> tuple[float, torch.Tensor]:
        x = torch.tensor([point], requires_grad=True)
        value, _ = loss(model, x, target)
        value.backward()
        return float(value.detach()) - float(np.log(2)), x.grad[0]

    far, _ = count([0.0, 0.0])
    near, _ = count([5.0, 0.0])
    # σ(α(d/η − 1)) is σ(−2) ≈ 0.12 for a guide at distance 0: the count is soft, not 0
    assert far > 2 * 5 * 0.7 and near < 0.2 * far
    for start in (1.0, 2.5, 4.0):
        _, grad = count([start, 0.0])
        assert grad[0] < 0, start  # descending moves x toward the class-1 cluster
    with pytest.raises(InputError, match="surrogate"):
        DeepKNN().adaptive_loss(1.0, "nearest")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 10.0])
def test_energy_agrees_with_pytorch_ood(temperature, trained_lenet, split):
    """The energy detector's score is the negation of pytorch-ood's ``EnergyBased`` outlier
    score on the same logits (at every temperature), through the whole detector."""
    from pytorch_ood.detector import EnergyBased

    xq = split[2][0][:100]
    det = build_detector("energy", temperature=temperature).fit(trained_lenet, *split[0])
    with torch.no_grad():
        logits = trained_lenet(xq)
    theirs = EnergyBased(None, t=temperature).predict_logits(logits).numpy()
    assert np.allclose(det.score_samples(xq), -theirs, rtol=1e-5, atol=1e-5)
    assert det.layer_keys == [] and det.state() == {}  # no layer, no bank
    with pytest.raises(InputError, match="temperature must be > 0"):
        build_detector("energy", temperature=0.0)
    with pytest.raises(InputError, match="the energy detector has no option k"):
        build_detector("energy", k=5)
