"""The stateful detection of query-based attacks on real MNIST digits: the encoding, the
calibrated threshold, and what it tells apart (a probing attack's near-copies from an honest
client's distinct or augmented images)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from advguard.data import load_dataset
from advguard.errors import InputError
from advguard.serve.matching import Bank, Rows, repeats
from advguard.serve.queries import DIMS, VIEW, QueryWatch, calibrate, encode, mean_knn, split


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset("mnist", "test", limit=2000).x


@pytest.fixture(scope="module")
def watch(digits) -> QueryWatch:
    return calibrate(encode(digits[:1000]), QueryWatch(query_false_alarm=0.01), seed=0)


def none(codes: np.ndarray) -> np.ndarray:
    return np.zeros((0, codes.shape[1]), dtype=np.float16)


def test_the_encoding_keeps_distances_and_is_blind_to_brightness_and_contrast(digits):
    """A code's projection is DIMS numbers whatever the image size and keeps the distances of
    the centred unit-length images within a few percent (Johnson–Lindenstrauss at 256); its
    pixel view is the image, pooled to at most VIEW values, where a perturbation within ε in
    L∞ stays within ε."""
    x = digits[:40]
    z = split(encode(x))[0]
    assert encode(x).shape == (40, DIMS + 784) and encode(x).dtype == np.float16
    u = (x.flatten(1) - x.flatten(1).mean(1, keepdim=True)).numpy()
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pairs = np.triu_indices(40, 1)
    true = np.linalg.norm(u[:, None] - u[None], axis=-1)[pairs]
    kept = np.linalg.norm(z[:, None] - z[None], axis=-1)[pairs]
    assert np.abs(kept / true - 1).mean() < 0.05 and np.abs(kept / true - 1).max() < 0.3
    assert np.allclose(split(encode(0.5 * x + 0.2))[0], z, atol=5e-3)
    assert not encode(torch.zeros(1, 1, 28, 28)).any()  # a blank codes as zeros
    assert encode(torch.rand(2, 3, 5, 7)).shape == (2, DIMS + 105)  # small: their own size
    big = torch.rand(2, 3, 224, 224)  # large images: average-pooled to 32×32 first
    pooled = torch.nn.functional.adaptive_avg_pool2d(big, 32)
    assert encode(big).shape == (2, DIMS + 18 * 18 * 3) and VIEW >= 18 * 18 * 3
    assert np.allclose(encode(big).astype(np.float32), encode(pooled).astype(np.float32),
                       atol=2e-3)
    noise = (torch.rand(big.shape) * 2 - 1) * 0.05
    moved = np.abs(split(encode(big + noise))[1] - split(encode(big))[1]).max()
    assert moved <= 0.05 + 1e-3  # float16 rounding


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
        v = float(image.view(-1)[i])
        image.view(-1)[i] = v + 0.2 if v <= 0.8 else v - 0.2
        queries.append(image)
    found = repeats(none(encode(image)), encode(torch.cat(queries)), watch)
    # the pixel view needs query_view_k earlier queries within its threshold
    assert not found[:watch.view_k].any() and found[watch.view_k:].all()


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
    with pytest.raises(InputError, match=f"needs more than {QueryWatch().query_k + 1} images"):
        calibrate(h, QueryWatch())
    with pytest.raises(InputError, match="no threshold"):
        repeats(h, h, QueryWatch())


def test_square_is_seen_and_an_app_that_retries_is_not(digits, watch, trained_mlp):
    """Square's queries (torchattacks, the reference settings, ε = 0.3: stripes of ±ε, then
    squares of them redrawn) against a real model, on ten digits: 29 detections in their
    streams (the 8×8 pooled encoding used before found 20: it averaged the stripes away).
    The same image sent again, however often, is never a detection (nothing new for an
    attacker)."""
    import torchattacks

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.queries: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.queries.append(x.detach().clone())
            return trained_mlp(x)

    test = load_dataset("mnist", "test", limit=2000)
    found = 0
    for i in range(1990, 2000):
        recorder = Recorder()
        torchattacks.Square(recorder, norm="Linf", eps=0.3, n_queries=40, p_init=0.8,
                            loss="margin", resc_schedule=False, seed=0)(test.x[i:i + 1],
                                                                        test.y[i:i + 1])
        codes = encode(torch.cat(recorder.queries))
        found += int(repeats(none(codes), codes, watch).sum())
    assert found >= 25
    same = encode(digits[7:8].repeat(30, 1, 1, 1))
    assert not repeats(none(same), same, watch).any()


def test_only_the_very_same_image_is_a_resend_and_old_codes_are_left_out(watch):
    """A one-pixel step on a large smooth image moves its code very little, but it is a new
    query, compared with the history (a probe there is detected); codes of another length —
    an earlier encoding's, still in a store — are left out of the history; a guard whose
    watch was calibrated for another encoding runs without it."""
    from advguard.serve.guard import GuardConfig
    from advguard.serve.matching import History
    from advguard.serve.queries import ENCODING

    side = torch.linspace(0, 1, 224)
    image = (side[None, :] * side[:, None]).expand(1, 3, 224, 224).clone()
    probe = []
    for i in range(30):
        image = image.clone()
        image[0, i % 3, 100 + i, 100] += 0.2
        probe.append(image)
    codes = encode(torch.cat(probe))
    assert len({c.tobytes() for c in codes}) == 30  # no two alike
    assert repeats(none(codes), codes, watch)[watch.query_k:].all()
    mixed = [np.zeros(64, np.float16), *codes[:3]]  # one code of the 8×8 encoding
    rows = [(i + 1, 0.0, c.tobytes(), "{}") for i, c in enumerate(mixed)]
    assert History.of(rows, codes.shape[1]).bank.raw.shape == (3, codes.shape[1])
    fields = {f: None for f in GuardConfig.__dataclass_fields__}
    old = GuardConfig(**{**fields, "queries": {**watch.to_json(), "encoding": "pixels8"}})
    assert old.watch() is None
    assert GuardConfig(**{**fields, "queries": {**watch.to_json(), "encoding": ENCODING}}
                       ).watch() == watch


def test_the_ball_of_the_threat_model_catches_blinded_probes_and_no_distinct_digit(digits):
    """With ``query_eps`` the pixel view's threshold is the ε-ball's diameter: a probe whose
    every query carries fresh noise of up to ε on half of the image (query blinding) is
    detected from its 6th query on (5 earlier ones in the ball, the default), from its 3rd with
    ``query_view_k`` 2; of 1,000 distinct digits none is taken for an earlier one unaligned,
    2 once aligned by up to 2 cells (the default), at most 1% with ``query_view_k`` 2."""
    watch = calibrate(encode(digits[:20]), QueryWatch(query_eps=0.3))
    assert watch.threshold is None and watch.view_threshold == pytest.approx(0.6, abs=2e-3)
    gen = torch.Generator().manual_seed(2)
    x0, probe = digits[3:4], []
    for i in range(40):
        q = x0.clone()
        q.view(-1)[int(torch.randint(784, (1,), generator=gen))] += 0.3  # a SimBA-like step
        noise = (torch.rand(x0.shape, generator=gen) * 2 - 1) * 0.3
        noise[..., :, (i % 2) * 14:(i % 2) * 14 + 14] = 0  # half of the image
        probe.append(torch.min(torch.max(q + noise, x0 - 0.3), x0 + 0.3).clamp(0, 1))
    codes = encode(torch.cat(probe))
    found = repeats(none(codes), codes, watch)
    assert watch.view_k == 5 and not found[:5].any() and found[5:].all()
    other = encode(digits[:1000])
    assert repeats(none(other), other, watch).mean() <= 0.005  # 2 of 1,000 (moved "1"s)
    assert not repeats(none(other), other, replace(watch, query_shift=0)).any()
    two = calibrate(encode(digits[:20]), QueryWatch(query_eps=0.3, query_view_k=2))
    found = repeats(none(codes), codes, two)
    assert not found[:2].any() and found[2:].all()
    # two earlier digits in the ball after aligning by shifts and crops: 12 of 1,000 (4
    # without the crops); the default 5 takes none
    assert repeats(none(other), other, two).mean() <= 0.015


def test_rows_added_and_dropped_in_place_match_a_plain_list():
    """The histories and the global index keep their rows in over-allocated columns (rows
    appended at the end, a prefix dropped by moving the start): after any sequence of appends,
    prefix drops and arbitrary masks, the columns are what plain concatenation gives."""
    rng = np.random.default_rng(0)
    rows, ids, codes = Rows(), np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.float32)
    top = 0
    for step in range(300):
        n = int(rng.integers(1, 9))
        new = rng.standard_normal((n, 3)).astype(np.float32)
        rows.append(ids=np.arange(top, top + n), code=new)
        ids, codes = np.concatenate([ids, np.arange(top, top + n)]), np.vstack([codes, new])
        top += n
        if step % 3 == 0:  # the oldest leave (a size limit, the TTL)
            keep = np.arange(len(ids)) >= int(rng.integers(0, len(ids) + 1))
        elif step % 7 == 0:  # rows leave from the middle (an expired client's queries)
            keep = rng.random(len(ids)) > 0.2
        else:
            continue
        rows.keep(keep)
        ids, codes = ids[keep], codes[keep]
        assert len(rows) == len(ids)
        assert np.array_equal(rows.get("ids"), ids)
        assert np.array_equal(rows.get("code"), codes)
    assert rows.get("missing") is None


def test_the_cheap_l_inf_bound_never_rules_out_a_row_within_the_threshold(digits):
    """Bank.linf rules rows out by a bound (chunk maxima) before the exact distance: every row
    it leaves at inf is truly farther than the threshold, every other distance is exact —
    on digits and on copies of one digit with noise inside the ball, over rows that skip
    some of the bank (another client's queries)."""
    rng = np.random.default_rng(1)
    x = digits[:300].clone()
    x[200:] = (x[0] + torch.empty_like(x[200:]).uniform_(-0.3, 0.3)).clamp(0, 1)
    bank, q = Bank.of(encode(x[1:])), Bank.of(encode(x[:1]))
    rows = np.flatnonzero(rng.random(len(bank)) > 0.3)
    exact = np.abs(bank.view[rows] - q.view[0]).max(1)
    for below in (0.3, 0.61, 0.9):
        got = bank.linf(q, 0, rows, below)
        inside = exact <= below
        assert np.allclose(got[inside], exact[inside])
        assert (exact[np.isinf(got)] > below).all()
        if below > 0.6:  # the noisy copies of the query (bank rows 199 on) are all found
            assert np.isfinite(got[rows >= 199]).all() and (rows >= 199).sum() > 50


@pytest.mark.parametrize("within", [True, False])
def test_a_view_only_scan_matches_its_definition(digits, within):
    """With no projection threshold (a watch calibrated for an ε ball) the scan reads the
    index by the pixel view alone; its findings must be the definition's, computed here by
    brute force: the very same image again is answered as its last copy; else a detection
    when the k-th nearest in L∞ (among the rows compared, less those skipped) is within the
    threshold, answered as the nearest."""
    from advguard.serve.matching import scan

    gen = torch.Generator().manual_seed(3)
    x = digits[:120].clone()
    x[60:90] = (x[0] + torch.empty(30, *x.shape[1:]).uniform_(-0.3, 0.3, generator=gen)
                ).clamp(0, 1)  # an attack's queries around digit 0
    x[90:100] = x[10:20]  # resends
    bank_codes, codes = encode(x[:100]), encode(torch.cat([x[60:62], x[12:13], x[1:2],
                                                           x[0:1] + 0.0]))
    codes[3] = bank_codes[1]  # the very same image
    skip = np.zeros(100, dtype=bool)  # another client's rows: most of the attack, a resend
    skip[60:85] = skip[92] = True
    k, window, t = 5, 99, 0.61
    got = scan(Bank.of(bank_codes), codes, k, window, None, t, within=within, skip=skip,
               view_k=k)
    seen = np.concatenate([bank_codes, codes]) if within else bank_codes
    view = split(seen)[1]
    qview = split(codes)[1]
    allowed = np.concatenate([~skip, np.ones(len(codes), dtype=bool)])
    for i in range(len(codes)):
        hi = 100 + i if within else 100
        rows = np.array([r for r in range(max(0, hi - window), hi) if allowed[r]])
        same = [r for r in rows if np.array_equal(seen[r].view(np.uint16),
                                                  codes[i].view(np.uint16))]
        dv = np.abs(view[rows] - qview[i]).max(1)
        if same:
            want = (False, same[-1])
        elif len(rows) >= k and np.sort(dv)[k - 1] < t:
            want = (True, rows[int(np.argmin(dv))])
        else:
            want = (False, -1)
        assert (bool(got.found[i]), int(got.match[i])) == want, i
    assert got.found.any() and (got.match >= 0).sum() > got.found.sum()  # both kinds occur


def test_a_code_does_not_depend_on_the_rest_of_its_batch(digits):
    """The service encodes a whole inference batch at once, and a resend is told by its code
    being bit for bit the same: each image's code must equal its code encoded alone (BLAS
    rounded a batch's projection differently for about half of the images)."""
    x = torch.cat([digits[:40], torch.rand(24, 1, 28, 28, generator=torch.Generator()
                                           .manual_seed(0))])
    together = encode(x)
    alone = np.concatenate([encode(x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(together.view(np.uint16), alone.view(np.uint16))
    # the scan tells the very same image by its projection's norm, to the bit
    assert np.array_equal(Bank.of(together).norms,
                          np.concatenate([Bank.of(together[i:i + 1]).norms
                                          for i in range(len(x))]))
    colour = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(encode(colour)[2:3].view(np.uint16),
                          encode(colour[2:3]).view(np.uint16))


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by ``(dy, dx)`` pixels, its edges repeated (an attacker's shift blinding)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    return padded[..., 2 - dy:2 - dy + h, 2 - dx:2 - dx + w]


def test_an_aligned_distance_is_the_nearest_shift_of_the_interior(digits):
    """Bank.aligned against its definition computed by brute force: the least, over shifts of
    up to ``most`` cells, of the L∞ distance between a row's interior (2 cells in from every
    side) and the query's window at that shift — exact where it can be below the threshold,
    inf only where it is truly farther; never farther than the unshifted distance."""
    from advguard.serve.queries import view_grid

    assert view_grid(784) == (1, 28, 28) and view_grid(972) == (3, 18, 18)
    assert view_grid(896) is None  # 28 × 32: not aligned
    gen = torch.Generator().manual_seed(4)
    x = digits[:200].clone()
    x[150:] = torch.cat([_shifted(x[0:1], int(a), int(b)) for a, b in
                         torch.randint(-2, 3, (50, 2), generator=gen)])
    x[150:] = (x[150:] + torch.empty_like(x[150:]).uniform_(-0.3, 0.3, generator=gen)).clamp(0, 1)
    bank, q = Bank.of(encode(x[1:])), Bank.of(encode(x[:1]))
    rows = np.arange(len(bank))
    v = bank.view.reshape(-1, 28, 28)[:, 2:26, 2:26].reshape(len(bank), -1)
    qv = q.view[0].reshape(28, 28)
    for most in (1, 2):
        want = np.min([np.abs(v - qv[2 + dy:26 + dy, 2 + dx:26 + dx].reshape(-1)).max(1)
                       for dy in range(-most, most + 1) for dx in range(-most, most + 1)], 0)
        for below in (0.4, 0.61):
            got = bank.aligned(q, 0, rows, below, most)
            inside = want <= below
            assert np.allclose(got[inside], want[inside])
            assert (want[np.isinf(got)] > below).all()
            assert (got[np.isfinite(got)] <= bank.linf(q, 0, rows, 9.0)[np.isfinite(got)]
                    + 1e-6).all()
    # the moved, noisy copies of the query are all within the ball once aligned by 2 cells
    # (many of them are not unaligned)
    assert np.isfinite(bank.aligned(q, 0, rows[149:], 0.61, 2)).all()
    assert np.isinf(bank.linf(q, 0, rows[149:], 0.61)).sum() > 10


def test_moved_queries_of_one_attack_are_found_and_distinct_digits_are_not(digits):
    """With ``query_eps`` the watch aligns a query by up to ``query_shift`` cells before the
    ball test: an attacker that moves every blinded query by up to 2 pixels is found from
    about its 6th query on (5 earlier ones in the ball after alignment), as a jittering camera
    is, while unaligned (``query_shift`` 0) most of its queries are fresh; no distinct digit of
    1,000 is taken for an earlier one more than 0.5% of the time."""
    gen = torch.Generator().manual_seed(5)
    x0, probe = digits[7:8], []
    for _ in range(40):
        noise = (torch.rand(x0.shape, generator=gen) * 2 - 1) * 0.3 * (
            torch.rand(x0.shape, generator=gen) < 0.5)
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        probe.append(_shifted((x0 + noise).clamp(0, 1), dy, dx))
    codes = encode(torch.cat(probe))
    moved = calibrate(encode(digits[:20]), QueryWatch(query_eps=0.3))
    still = calibrate(encode(digits[:20]), QueryWatch(query_eps=0.3, query_shift=0))
    assert moved.shift == 2 and still.shift == 0
    assert QueryWatch(query_shift=2).shift == 0  # a calibrated threshold is measured unmoved
    found = repeats(none(codes), codes, moved)
    assert not found[:5].any() and found[10:].mean() >= 0.9
    assert repeats(none(codes), codes, still)[10:].mean() <= 0.5
    other = encode(digits[:1000])
    assert repeats(none(other), other, moved).mean() <= 0.005
    with pytest.raises(InputError, match="query_shift"):
        QueryWatch(query_shift=3)


def test_pooled_colour_views_are_aligned_by_moving_the_image_before_pooling():
    """A colour view is pooled (32 → 18 cells), so a move of one pixel is a fraction of a
    cell and no shift of the view undoes it: the scan takes the query's view moved before
    pooling (``moves``). A CIFAR-10 image moved by up to 2 pixels with sensor noise is then
    within the 8/255 ball of the unmoved one (it is not, unaligned or aligned by view cells);
    the unmoved window is the code's own interior; grey views are their pixels (no moves)."""
    from advguard.serve.matching import scan
    from advguard.serve.queries import moves

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    x = load_dataset("cifar10", "test", limit=40, data_dir=shared).x
    gen = torch.Generator().manual_seed(7)
    frames = []
    for _ in range(12):
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        frames.append((torch.roll(x[3:4], (dy, dx), dims=(2, 3))
                       + 0.01 * torch.randn(1, 3, 32, 32, generator=gen)).clamp(0, 1))
    frames = torch.cat(frames)
    codes, moved = encode(frames), moves(frames)
    assert moved is not None and moved.shape == (12, 25, 3 * 14 * 14)
    inner = split(codes)[1].reshape(12, 3, 18, 18)[:, :, 2:16, 2:16].reshape(12, -1)
    assert np.array_equal(moved[:, 0], inner)  # unmoved first: the code's own interior
    assert moves(torch.rand(2, 1, 28, 28)) is None and moves(torch.rand(2, 1, 32, 32)) is None
    ball = 2 * 8 / 255 + 2 ** -10
    bank = Bank.of(codes[:-1])
    rows = np.arange(len(bank))
    near_moved = bank.aligned(Bank.of(codes[-1:]), 0, rows, ball, 2, moved[-1])
    near_cells = bank.aligned(Bank.of(codes[-1:]), 0, rows, ball, 2)
    assert (near_moved < ball).sum() >= 5 > (near_cells < ball).sum()
    found = scan(bank, codes[-1:], 5, 1000, None, ball, shift=2, moved=moved[-1:])
    assert found.found[0]
    others = encode(x)
    assert not scan(Bank.of(others[:-1]), others[-1:], 5, 1000, None, ball, shift=2,
                    moved=moves(x[-1:])).found[0]


def test_crops_are_moved_as_torch_crops_and_resizes_an_image():
    """A query's crops (0 to 2 pixels off each side, resized back bilinearly) are taken one
    axis at a time, pooling included (two matrix products for a batch, not a resize per
    move): the windows agree with torch's 2-D crop, resize and pooling to float16's rounding,
    for every pair of the axes' moves in order (rows first, unmoved first); the shifts alone
    are the first moves of each axis, so a watch without crops compares the same windows; a
    grey view that is its pixels is moved as the image is (``view_moves``)."""
    import torch.nn.functional as F

    from advguard.serve.queries import _pooled, _view, axis_moves, moves, view_moves

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    x = load_dataset("cifar10", "test", limit=6, data_dir=shared).x
    axis = axis_moves(2, 2)
    assert axis[:5] == [(0, 0, 0), (-1, 0, 0), (1, 0, 0), (-2, 0, 0), (2, 0, 0)]
    assert len(axis) == 13 and (0, 2, 2) in axis and (0, 0, 0) not in axis[5:]

    def torch_moved(z: torch.Tensor, ym: tuple, xm: tuple) -> torch.Tensor:
        (dy, t, b), (dx, left, r) = ym, xm
        h, w = z.shape[-2:]
        z = F.pad(z, (2,) * 4, mode="replicate")[..., 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
        if t or b or left or r:
            z = F.interpolate(z[..., t:h - b, left:w - r], size=(h, w), mode="bilinear",
                              align_corners=False)
        return z

    got = moves(x, 2, 2)
    assert got is not None and got.shape == (6, 169, 3 * 14 * 14)
    grey = x[:, :1, 2:30, 2:30]  # 28 × 28: its view is its pixels
    for image, windows, inner in ((x, got, slice(2, 16)),
                                  (grey, view_moves(split(encode(grey))[1], 2, 2), slice(2, 26))):
        z = _pooled(image)
        for k, (ym, xm) in enumerate((a, b) for a in axis for b in axis):
            want = _view(torch_moved(z, ym, xm))[:, :, inner, inner].flatten(1).numpy()
            assert np.abs(windows[:, k] - want).max() < 5e-4, (ym, xm)
    shifted = moves(x, 2)  # the same numbers, to float16's rounding of a product's
    assert shifted is not None and np.abs(
        shifted - got.reshape(6, 13, 13, -1)[:, :5, :5].reshape(6, 25, -1)).max() <= 2 ** -11


def test_a_cash_in_after_cropped_queries_is_answered_as_they_were():
    """An attacker that crops every query (0 to 2 pixels a side, resized back) leaves the 8/255
    ball of a CIFAR-10 image with each, and no shift brings it back; the watch aligns a query
    by the crops too (``query_crop``). The unmoved candidate it sends to cash in a success
    then lies within 2ε of its earlier cropped queries — its crops are theirs up to the
    blinding noise — and is answered as one of them was; aligned by shifts alone it is a
    fresh query. No distinct test image is taken for an earlier one."""
    from advguard.serve.matching import scan
    from advguard.serve.queries import moves

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    x = load_dataset("cifar10", "test", limit=60, data_dir=shared).x
    eps, gen = 8 / 255, torch.Generator().manual_seed(13)
    queries = []
    for _ in range(31):
        noise = (torch.rand(x[5:6].shape, generator=gen) * 2 - 1) * eps * (
            torch.rand(x[5:6].shape, generator=gen) < 0.5)
        queries.append((x[5:6] + noise).clamp(0, 1))
    for i in range(30):
        t, b, left, r = (int(v) for v in torch.randint(0, 3, (4,), generator=gen))
        if not t + b + left + r:
            t = 1  # a crop, every one
        queries[i] = torch.nn.functional.interpolate(
            queries[i][..., t:32 - b, left:32 - r], size=(32, 32), mode="bilinear",
            align_corners=False).clamp(0, 1)
    sent = torch.cat(queries)
    codes, ball = encode(sent), 2 * eps + 2 ** -10
    bank, cash_in = Bank.of(codes[:-1]), codes[-1:]
    aligned = scan(bank, cash_in, 5, 1000, None, ball, shift=2, crop=2,
                   moved=moves(sent[-1:], 2, 2))
    shifted = scan(bank, cash_in, 5, 1000, None, ball, shift=2, moved=moves(sent[-1:], 2))
    assert aligned.found[0] and aligned.match[0] >= 0
    assert not shifted.found[0] and shifted.match[0] < 0 and len(shifted.ball[0]) == 0
    others = encode(x)
    every = moves(x, 2, 2)
    for i in range(1, len(x)):
        assert not scan(Bank.of(others[:i]), others[i:i + 1], 5, 1000, None, ball, shift=2,
                        crop=2, moved=every[i:i + 1]).found[0]


def test_the_watch_aligns_crops_by_default_from_the_windows_to_the_findings():
    """The service's path: ``QueryWatch.windows`` (the inference thread) gives a query's 169
    moves with ``query_eps`` (25 with ``--query-crop 0``; none without ``query_eps``, whose
    calibrated thresholds were measured unmoved), and ``detect`` (what both stores run inside
    their admission) answers the unmoved cash-in of a crop search as an earlier query with
    the default watch, fresh with crops off; windows of another watch are refused."""
    from advguard.serve.matching import detect

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    x = load_dataset("cifar10", "test", limit=8, data_dir=shared).x
    eps, gen = 8 / 255, torch.Generator().manual_seed(17)
    sent = []
    for i in range(21):
        q = (x[2:3] + (torch.rand(x[2:3].shape, generator=gen) * 2 - 1) * eps * (
            torch.rand(x[2:3].shape, generator=gen) < 0.5)).clamp(0, 1)
        if i < 20:  # cropped, 1 or 2 pixels off the top and left, 0 to 2 off the others
            t, left = (int(v) for v in torch.randint(1, 3, (2,), generator=gen))
            b, r = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
            q = torch.nn.functional.interpolate(q[..., t:32 - b, left:32 - r], size=(32, 32),
                                                mode="bilinear", align_corners=False)
        sent.append(q.clamp(0, 1))
    sent = torch.cat(sent)
    codes = encode(sent)
    watch = calibrate(encode(x), QueryWatch(query_eps=eps, query_global=0))
    shifts_only = replace(watch, query_crop=0)
    assert watch.crop == 2 and QueryWatch(query_crop=2).crop == 0
    windows = watch.windows(sent[-1:])
    assert windows is not None and windows.shape == (1, 169, 3 * 14 * 14)
    assert shifts_only.windows(sent[-1:]).shape == (1, 25, 3 * 14 * 14)
    answers = [f"answer-{i}" for i in range(20)]
    found = detect(codes[:20], answers, codes[20:], ["fresh"], watch, moved=windows)
    assert found.detections[0] and found.answers[0] in answers
    fresh = detect(codes[:20], answers, codes[20:], ["fresh"], shifts_only,
                   moved=shifts_only.windows(sent[-1:]))
    assert not fresh.detections[0] and fresh.answers[0] is None
    with pytest.raises(InputError, match="25 moved windows a query for shifts of 2 and crops"):
        detect(codes[:20], answers, codes[20:], ["fresh"], watch,
               moved=shifts_only.windows(sent[-1:]))


def test_moved_queries_are_aligned_with_the_newest_of_the_history_only(digits):
    """Alignment by moves is taken against the newest ``ALIGN_ROWS`` rows (older ones are
    compared unmoved): 6 moved copies of a digit are found behind 100 other digits, not
    behind 200."""
    from advguard.serve.matching import ALIGN_ROWS, scan

    gen = torch.Generator().manual_seed(9)
    copies = torch.cat([_shifted(digits[0:1], int(a), int(b))
                        for a, b in torch.randint(-2, 3, (7, 2), generator=gen)])
    moved_copies, query = encode(copies[:6]), encode(copies[6:])
    for between, found in ((100, True), (200, False)):
        assert (between < ALIGN_ROWS) == found
        bank = Bank.of(np.concatenate([moved_copies, encode(digits[1:1 + between])]))
        got = scan(bank, query, 5, 1000, None, 0.601, shift=2)
        assert bool(got.found[0]) == found


def test_queries_prepared_before_the_admission_scan_as_their_codes_do(digits):
    """The service prepares a batch's codes on the inference thread (``prepare``: the bank,
    each query's moved windows and their chunk maxima); a scan of the prepared queries finds,
    matches and keeps in its ball the very same rows as a scan of the codes — a grey view
    moved by its own cells, a pooled colour view by the image's moves."""
    from advguard.serve.matching import prepare, scan
    from advguard.serve.queries import moves

    gen = torch.Generator().manual_seed(11)
    frames = torch.cat([_shifted(digits[3:4], int(a), int(b)) for a, b in
                        torch.randint(-2, 3, (12, 2), generator=gen)])
    frames = (frames + 0.05 * torch.randn(frames.shape, generator=gen)).clamp(0, 1)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    colour = load_dataset("cifar10", "test", limit=8, data_dir=shared).x
    colour = torch.cat([colour, torch.roll(colour[:4], (1, -2), dims=(2, 3))])
    for x, ball in ((torch.cat([digits[20:40], frames]), 0.601), (colour, 2 * 8 / 255)):
        codes, moved = encode(x), moves(x)
        bank, queries = Bank.of(codes[:-8]), codes[-8:]
        ready = prepare(queries, 2, None if moved is None else moved[-8:])
        assert ready.moved is not None and ready.moved_maxima is not None
        plain = scan(bank, queries, 3, 1000, None, ball, shift=2,
                     moved=None if moved is None else moved[-8:])
        got = scan(bank, ready, 3, 1000, None, ball, shift=2)
        assert np.array_equal(plain.found, got.found) and np.array_equal(plain.match, got.match)
        assert all(np.array_equal(a, b) for a, b in zip(plain.near, got.near, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(plain.ball, got.ball, strict=True))
        assert plain.found.any() or any(len(b) for b in plain.ball)  # something to compare
        unmoved = scan(bank, queries, 3, 1000, None, ball)  # the alignment decided some rows
        assert not np.array_equal(unmoved.found, plain.found) or any(
            len(a) != len(b) for a, b in zip(unmoved.ball, plain.ball, strict=True))
        one = ready[2:3]  # a request's rows of a batch keep their windows
        assert one.moved is not None and np.array_equal(one.moved[0], ready.moved[2])
