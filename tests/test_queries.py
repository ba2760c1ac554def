"""The stateful detection of query-based attacks on real MNIST digits: the encoding, the
calibrated threshold, and what it tells apart (a probing attack's near-copies from an honest
client's distinct or augmented images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advguard.data import load_dataset
from advguard.errors import InputError
from advguard.serve.queries import QueryWatch, calibrate, encode, mean_knn, repeats


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset("mnist", "test", limit=2000).x


@pytest.fixture(scope="module")
def watch(digits) -> QueryWatch:
    return calibrate(encode(digits[:1000]), QueryWatch(query_false_alarm=0.01), seed=0)


def none(codes: np.ndarray) -> np.ndarray:
    return np.zeros((0, codes.shape[1]), dtype=np.float16)


def test_the_encoding_is_unit_length_and_blind_to_brightness_and_contrast(digits):
    x = digits[:8]
    z = encode(x).astype(np.float32)
    assert z.shape == (8, 64) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-2)
    assert np.allclose(encode(0.5 * x + 0.2).astype(np.float32), z, atol=2e-3)
    assert not encode(torch.zeros(1, 1, 28, 28)).any()  # a blank codes as zeros
    assert encode(torch.rand(2, 3, 5, 7)).shape == (2, 3 * 5 * 5)  # small images: their size


def test_the_threshold_keeps_its_false_alarm_rate_on_other_digits(digits, watch):
    """Calibrated to 1% on digits 0–999, it flags about 1% of digits 1000–1999 streamed from
    one client (each compared with the ones before it)."""
    other = encode(digits[1000:2000])
    rate = repeats(none(other), other, watch).mean()
    assert rate <= 0.03


def test_a_probing_attack_is_detected_after_k_queries(digits, watch):
    """SimBA's queries: one pixel moved by 0.2 at a time, each query the last one plus a
    step (as the attack sends them)."""
    gen = torch.Generator().manual_seed(0)
    image, queries = digits[0:1].clone(), []
    for _ in range(60):
        i = int(torch.randint(784, (1,), generator=gen))
        image = image.clone()
        image.view(-1)[i] = (image.view(-1)[i] + 0.2).clamp(0, 1)
        queries.append(image)
    found = repeats(none(encode(image)), encode(torch.cat(queries)), watch)
    assert not found[:watch.query_k].any() and found[watch.query_k:].all()


def test_an_honest_client_sending_augmented_copies_is_not_an_attack(digits, watch):
    """Five copies of each of 40 digits, each shifted by up to 2 pixels, rescaled in
    brightness and noised, as a camera or a retrying app sends them."""
    gen = torch.Generator().manual_seed(1)
    copies = []
    for i in range(40):
        for _ in range(5):
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            c = torch.roll(digits[i:i + 1], (dy, dx), (2, 3))
            c = c * (0.7 + 0.6 * torch.rand(1, generator=gen)) + 0.05 * torch.randn(
                c.shape, generator=gen)
            copies.append(c.clamp(0, 1))
    codes = encode(torch.cat(copies))
    assert repeats(none(codes), codes, watch).sum() <= 2


def test_mean_knn_needs_k_neighbours_and_calibration_needs_images():
    h = np.eye(4, dtype=np.float16)
    assert np.isnan(mean_knn(h[:2], h[:1], 3)).all()
    assert mean_knn(h, h[:1], 2)[0] == pytest.approx(np.sqrt(2) / 2, abs=1e-3)
    with pytest.raises(InputError, match="needs more than 21 images"):
        calibrate(h, QueryWatch())
    with pytest.raises(InputError, match="no threshold"):
        repeats(h, h, QueryWatch())
