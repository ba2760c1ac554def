from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from advguard.attacks import fgsm_directions
from advguard.data import strength_grid
from advguard.errors import InputError
from advguard.strengths import (
    agreement_rate,
    estimate_H,
    exhaustive_select,
    mssim,
    mssim_table,
    random_walk_select,
    ssim_per_image,
    strength_bound,
    transition_matrix,
)
from advguard.training import MULTI_STRENGTH

# --- SSIM ------------------------------------------------------------------------------------


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. (2004) written out: Gaussian window 11, sigma 1.5, 'valid' region."""
    r = np.arange(11) - 5
    w = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()

    def blur(img):
        out = correlate1d(correlate1d(img, w, axis=0, mode="constant"), w, axis=1,
                          mode="constant")
        return out[5:-5, 5:-5]

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sx, sy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sx + sy + c2))
    return float(ssim_map.mean())


def test_ssim_of_identical_images_is_one(mnist_test):
    x = mnist_test.x[:50]
    assert torch.allclose(ssim_per_image(x, x), torch.ones(50), atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.7
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    want = (2 * a * b + 0.01 ** 2) / (a * a + b * b + 0.01 ** 2)
    assert float(ssim_per_image(x, y)) == pytest.approx(want, rel=1e-4)


def test_ssim_matches_the_written_out_definition():
    rng = np.random.default_rng(0)
    x = rng.random((20, 24))
    y = np.clip(x + 0.1 * rng.standard_normal((20, 24)), 0, 1)
    got = float(ssim_per_image(torch.tensor(x)[None, None].float(),
                               torch.tensor(y)[None, None].float()))
    assert got == pytest.approx(reference_ssim(x, y), abs=1e-5)


def test_ssim_averages_channels():
    rng = np.random.default_rng(1)
    x = rng.random((3, 16, 16))
    y = np.clip(x + 0.05 * rng.standard_normal((3, 16, 16)), 0, 1)
    want = np.mean([reference_ssim(x[c], y[c]) for c in range(3)])
    got = float(ssim_per_image(torch.tensor(x)[None].float(), torch.tensor(y)[None].float()))
    assert got == pytest.approx(want, abs=1e-5)


def test_mssim_drops_monotonically_with_strength_on_real_mnist(trained_lenet, mnist_test):
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    grid = strength_grid(0.3, 0.03)
    table = mssim_table(x, fgsm_directions(trained_lenet, x, y), grid, batch_size=128)
    assert table[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(table, table[1:], strict=False))
    assert table[-1] == pytest.approx(mssim(x, (x + 0.3 * fgsm_directions(
        trained_lenet, x, y)).clamp(0, 1)), abs=1e-6)


def test_strength_bound():
    grid = [0.0, 0.1, 0.2, 0.3]
    assert strength_bound(grid, [1.0, 0.9, 0.8, 0.7], 0.8) == 0.2
    assert strength_bound(grid, [1.0, 0.9, 0.8, 0.7], 0.95) == 0.0
    assert strength_bound(grid, [1.0, 0.9, 0.85, 0.86], 0.7) == 0.3
    with pytest.raises(InputError):
        strength_bound(grid, [1.0], 0.5)


def test_ssim_rejects_mismatched_or_tiny_images():
    with pytest.raises(InputError, match="equal shape"):
        ssim_per_image(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 15))
    with pytest.raises(InputError, match="at least 11x11"):
        ssim_per_image(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


# --- selection -------------------------------------------------------------------------------

# Hand-made working zones: the model trained at e_i is good (0.9) near column i, weak elsewhere,
# so the envelope of {0, 3, 6} covers every column and no smaller set does.
ZONES = np.full((8, 8), 0.3)
for i in range(8):
    for j in range(8):
        if abs(i - j) <= 1:
            ZONES[i, j] = 0.9 - 0.01 * abs(i - j)


def test_H_is_the_envelope_for_parallel_and_a_blend_for_mixed():
    A = np.array([[0.9, 0.5], [0.4, 0.8]])
    assert estimate_H(A, [0, 1], "parallel") == pytest.approx((0.9 + 0.8) / 2)
    assert estimate_H(A, [0], "parallel") == pytest.approx(0.7)
    assert estimate_H(A, [0, 1], "mixed") == pytest.approx(((0.9 + 0.8) / 2 + 0.65) / 2)


def test_transition_matrix_is_row_normalised_accuracy():
    P = transition_matrix(ZONES)
    assert np.allclose(P.sum(axis=1), 1.0)
    assert np.allclose(P[2], ZONES[2] / ZONES[2].sum())


def brute_force(A, penalty, combination):
    best = None
    for size in range(1, len(A) + 1):
        for s in itertools.combinations(range(len(A)), size):
            g = estimate_H(A, s, combination) + penalty * size
            if best is None or g > best[0] + 1e-12:
                best = (g, s)
    return best


@pytest.mark.parametrize("combination", list(MULTI_STRENGTH))
@pytest.mark.parametrize("penalty", [0.0, -0.01, -0.05, -0.3])
def test_exhaustive_search_is_the_optimum(combination, penalty):
    g, subset = brute_force(ZONES, penalty, combination)
    best = exhaustive_select(ZONES, penalty=penalty, combination=combination)
    assert best.G == pytest.approx(g)
    assert best.subset == subset or best.G == pytest.approx(g)


def test_known_optimum_of_the_zones_matrix():
    best = exhaustive_select(ZONES, penalty=-0.01)
    assert best.subset == (1, 4, 7) or len(best.subset) == 3
    assert best.H == pytest.approx(0.9 - 0.01 * 2 / 8 * 3, abs=0.01)


def test_walk_finds_the_exact_optimum_with_a_seed():
    exact = exhaustive_select(ZONES, penalty=-0.01)
    walk = random_walk_select(ZONES, walks=1000, steps=8, penalty=-0.01, seed=0)
    assert walk.subset == exact.subset and walk.G == pytest.approx(exact.G)


@pytest.mark.parametrize("combination", list(MULTI_STRENGTH))
def test_walk_finds_the_optimum_for_95_percent_of_seeds(combination):
    # the documented defaults: t = 1000 walks of l = 8 steps (200 walks find it ~75% of the time)
    rate = agreement_rate(ZONES, range(100), walks=1000, steps=8, penalty=-0.01,
                          combination=combination)
    assert rate >= 0.95


def test_too_short_a_walk_misses_the_optimum_sometimes():
    # the agreement check can fail: 3 walks of 1 step rarely assemble a 3-strength set
    assert agreement_rate(ZONES, range(50), walks=3, steps=1, penalty=-0.01) < 0.5


def test_penalty_trades_accuracy_for_fewer_strengths():
    many = exhaustive_select(ZONES, penalty=0.0)
    few = exhaustive_select(ZONES, penalty=-0.3)
    assert len(few.subset) == 1 < len(many.subset)


def test_selection_rejects_bad_matrices():
    with pytest.raises(InputError, match="square"):
        random_walk_select(np.ones((2, 3)))
    with pytest.raises(InputError, match="finite"):
        exhaustive_select(np.array([[np.nan]]))
    with pytest.raises(InputError, match="≤ 0"):
        random_walk_select(ZONES, penalty=0.1)


def test_the_walk_draws_what_generator_choice_draws():
    """The walk's steps come from the transition rows' cumulative sums and one uniform draw
    each, as numpy's ``Generator.choice(m, p=row)`` makes them: every seed selects what a walk
    built on ``choice`` selects (runs recorded before keep their selections)."""
    from advguard.strengths.selection import objective, transition_matrix

    def reference(A: np.ndarray, walks: int, steps: int, seed: int) -> tuple[int, ...]:
        P, rng, m = transition_matrix(A), np.random.default_rng(seed), len(A)
        best = None
        for _ in range(walks):
            state = int(rng.integers(m))
            visited = {state}
            for step in range(steps + 1):
                if step:
                    state = int(rng.choice(m, p=P[state]))
                    visited.add(state)
                cand = objective(A, sorted(visited), -0.01, "parallel")
                if best is None or cand.rank() > best.rank():
                    best = cand
        return best.subset

    rng = np.random.default_rng(1)
    for m in (3, 6, 11):
        A = rng.random((m, m))
        for seed in range(10):
            assert random_walk_select(A, walks=30, steps=8, penalty=-0.01,
                                      seed=seed).subset == reference(A, 30, 8, seed)
