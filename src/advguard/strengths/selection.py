"""Random-walk strength selection (paper §4.3, SPEC A5) and the exact search that checks it.

``A`` is the m × m accuracy matrix: ``A[i, j]`` is the validation accuracy of the model trained
at candidate strength ``e_i`` under test strength ``e_j`` (one grid for both).

* ``H_parallel(S) = mean_j max_{i∈S} A[i, j]`` — the envelope of the members' working zones.
* ``H_mixed(S) = mean_j (max_{i∈S} A[i, j] + mean_{i∈S} A[i, j]) / 2`` — advguard's estimate for
  one model trained on all of S: it reaches the envelope only halfway, because the strengths
  share one model's capacity (with the plain mean, mixing could never beat the best single
  strength, and the selection would be trivial).
* ``G(S) = H(S) + a·|S|`` with ``a ≤ 0`` the penalty per strength.

The walk (default transition ``P = A_M``, A row-normalised): ``t`` walks of ``l`` steps from a
uniformly drawn start; the set of states visited after every step is a candidate; the best G wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advguard.errors import InputError
from advguard.options import check_int, option
from advguard.training import MULTI_STRENGTH, Method


@dataclass(frozen=True)
class Walk:
    """The random walk's settings (SPEC A5), declared once."""

    walks: int = 1000  # t; with l = 8 they find the exact optimum of the tests
    steps: int = 8  # l, steps per walk
    penalty: float = -0.001  # a in G = H + a·S (0.1 point of accuracy per extra strength)
    seed: int = 0


@dataclass(frozen=True)
class SelectOptions:
    """The strength selection's options as the command line takes them (``select-strengths``;
    ``reproduce mat`` takes ``walks``, ``walk_steps`` and ``penalty`` from here)."""

    walks: int = option(Walk.walks, "random walks t (strength selection)")
    walk_steps: int = option(Walk.steps, "steps per walk l")
    penalty: float = option(Walk.penalty, "a ≤ 0 in G = H + a·S")
    combination: str = option(Method.PARALLEL.value, "parallel or mixed")
    seed: int = option(Walk.seed, "seed of the walk")
    seeds: int = option(100, "seeds to measure the walk's agreement with the optimum over")

    def __post_init__(self) -> None:
        for name in ("walks", "seeds"):
            check_int(name, getattr(self, name))
        check_int("walk_steps", self.walk_steps, minimum=0)
        if self.penalty > 0:
            raise InputError(f"penalty must be ≤ 0, got {self.penalty}")
        _combination(self.combination)


def _combination(combination: Method | str) -> Method:
    method = Method(combination)
    if method not in MULTI_STRENGTH:
        raise InputError(f"strength selection combines strengths for "
                         f"{' or '.join(m.value for m in MULTI_STRENGTH)} MAT, not {method.value}")
    return method


@dataclass(frozen=True)
class Selection:
    subset: tuple[int, ...]  # indices into the candidate strengths, ascending
    G: float
    H: float

    def rank(self) -> tuple[float, int, tuple[int, ...]]:
        """Order of preference: higher G (to 1e-12), then fewer strengths, then the
        lexicographically smaller subset — the same tie-break for the walk and the search."""
        return (round(self.G, 12), -len(self.subset), tuple(-i for i in self.subset))


def _check_matrix(A: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    try:
        A = np.asarray(A, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError("the accuracy matrix must be a square list of lists of numbers (rows "
                         "of equal length)") from None
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise InputError(f"the accuracy matrix must be square and non-empty, got shape {A.shape}")
    if not np.isfinite(A).all() or A.min() < 0:
        raise InputError("the accuracy matrix must hold finite non-negative accuracies")
    return A


def estimate_H(A: np.ndarray, subset: Sequence[int],
               combination: Method | str = Method.PARALLEL) -> float:
    """H(subset): the estimated grid-mean accuracy of a multi-strength combination."""
    rows = A[list(subset)]
    envelope = rows.max(axis=0).mean()
    if _combination(combination) is Method.PARALLEL:
        return float(envelope)
    return float((envelope + rows.mean(axis=0).mean()) / 2)


def objective(A: np.ndarray, subset: Sequence[int], penalty: float,
              combination: Method | str = Method.PARALLEL) -> Selection:
    h = estimate_H(A, subset, combination)
    return Selection(tuple(sorted(subset)), h + penalty * len(subset), h)


def transition_matrix(A: np.ndarray) -> np.ndarray:
    """``A_M``: each row of A divided by its sum (row-stochastic), the default transitions."""
    A = _check_matrix(A)
    sums = A.sum(axis=1, keepdims=True)
    uniform = np.full_like(A, 1.0 / A.shape[1])
    return np.where(sums > 0, A / np.where(sums > 0, sums, 1.0), uniform)


def random_walk_select(A: np.ndarray | Sequence[Sequence[float]], *, walks: int = Walk.walks,
                       steps: int = Walk.steps, penalty: float = Walk.penalty,
                       combination: Method | str = Method.PARALLEL,
                       seed: int = Walk.seed) -> Selection:
    """The paper's selection: the best G over the sets visited by ``walks`` walks of ``steps``."""
    A = _check_matrix(A)
    if penalty > 0:
        raise InputError(f"the penalty per strength must be ≤ 0, got {penalty}")
    if walks < 1 or steps < 0:
        raise InputError("walks must be ≥ 1 and steps ≥ 0")
    P = transition_matrix(A)
    # Generator.choice(m, p=row) draws u = random() and returns cdf.searchsorted(u, "right"):
    # the same draws, without choice's per-call checks of p (the walk's hot spot)
    cdf = P.cumsum(axis=1)
    cdf /= cdf[:, -1:]
    rng = np.random.default_rng(seed)
    m = A.shape[0]
    seen: dict[frozenset[int], Selection] = {}
    best: Selection | None = None
    for _ in range(walks):
        state = int(rng.integers(m))
        visited = {state}
        for step in range(steps + 1):
            if step:
                state = int(cdf[state].searchsorted(rng.random(), side="right"))
                visited.add(state)
            key = frozenset(visited)
            if key not in seen:
                seen[key] = objective(A, sorted(key), penalty, combination)
                if best is None or seen[key].rank() > best.rank():
                    best = seen[key]
    assert best is not None
    return best


def exhaustive_select(A: np.ndarray | Sequence[Sequence[float]], *, penalty: float = Walk.penalty,
                      combination: Method | str = Method.PARALLEL) -> Selection:
    """The exact optimum of the same G over every non-empty subset (m ≤ 16)."""
    A = _check_matrix(A)
    m = A.shape[0]
    if m > 16:
        raise InputError(f"exhaustive search is limited to 16 candidates, got {m}")
    best: Selection | None = None
    for size in range(1, m + 1):
        for subset in itertools.combinations(range(m), size):
            cand = objective(A, subset, penalty, combination)
            if best is None or cand.rank() > best.rank():
                best = cand
    assert best is not None
    return best


def agreement_rate(A: np.ndarray | Sequence[Sequence[float]], seeds: Sequence[int], *,
                   walks: int = Walk.walks, steps: int = Walk.steps, penalty: float = Walk.penalty,
                   combination: Method | str = Method.PARALLEL) -> float:
    """Share of ``seeds`` for which the walk returns the exact optimum's subset."""
    exact = exhaustive_select(A, penalty=penalty, combination=combination).subset
    hits = sum(random_walk_select(A, walks=walks, steps=steps, penalty=penalty,
                                  combination=combination, seed=s).subset == exact
               for s in seeds)
    return hits / len(seeds)
