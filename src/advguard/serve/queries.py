"""Stateful detection of query-based black-box attacks (Chen, Carlini & Wagner 2019, "Stateful
detection of black-box adversarial attacks"), made to hold against an attacker who knows it:
query blinding, many keys, and the watch's own answers as an oracle (OARS, Feng et al. 2023).

A query-based attacker (Square, SimBA, HopSkipJump, Boundary) sends hundreds to thousands of
queries that all lie within the ε-ball of one image; an honest client sends different images —
or, a camera, near-copies of one scene. Each query is encoded (:func:`encode`) in two views: a
fixed random projection of the centred, unit-length image (``DIMS`` numbers: L2 distances kept,
brightness and contrast cancel) and its pixels pooled to at most ``VIEW`` values (the *pixel
view*: a perturbation within ε in L∞ stays within ε there, so blinding noise inside the ball
cannot move a query out of it). A query is a detection (:func:`scan`) when the mean L2 distance
of its projection to its ``k`` nearest earlier queries falls below ``threshold``, or when ``k``
earlier queries lie within ``view_threshold`` of it in L∞ in the pixel view; both thresholds are
calibrated by :func:`calibrate` on distinct held-out images to a stated false-alarm rate.
With ``query_eps``, a query is also aligned with the newest queries of its client and of the
global index by the move that brings it nearest (:func:`moves`: shifts of up to 2 pixels and
crops of up to 2 pixels a side resized back, each axis), so moving or cropping every query
does not leave the ball.

Queries are compared with their client's bounded history (``query_history`` queries,
``query_ttl_s`` seconds) and, account-obliviously (Li et al. 2022, "Blacklight"), with the
newest ``query_global`` queries of every client (:class:`Ring`, thresholds of its own), each
kept with the answer it was given. **A detection is answered as the query it copies was**
(:func:`detect`): a near-copy tells an attacker nothing its earlier answer did not — whether it
was blinded or sent under another key — while a camera's frames keep getting their scene's
answer. The very same image sent again (an app that retries) is answered as it was and is no
detection. The stores of :mod:`advguard.serve.stores` keep the histories beside each client's
record; :mod:`advguard.serve.state` counts what the findings add up to.

The projection and ``k`` were chosen on validation traffic (Square streams and augmented honest
streams on MNIST training images, none of the test images the benchmarks report); the pixel
view was added for blinded streams of the same kind (``benchmarks/choose_flip_limit.py``);
docs/SERVING.md ("The query watch") has both.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advguard import options
from advguard.errors import InputError
from advguard.options import check_at_least, check_fraction, option

SIDE = 32  # images larger than SIDE × SIDE are average-pooled to it before encoding
DIMS = 256  # the random projection's size: a code's first DIMS float16 numbers
VIEW = 1024  # the pixel view's most values (32×32 grey; colour is pooled to 18×18×3)
SHIFT = 2  # the most pixels a query is aligned by (QueryWatch.query_shift)
CROP = 2  # the most pixels a side a query is cropped by to align it (QueryWatch.query_crop)
# the encoding's name, with a fingerprint of the projection's random stream (a numpy whose
# generator drew other numbers would encode otherwise): a watch calibrated for another
# encoding is not used
ENCODING = (f"pixels{SIDE}-projection{DIMS}-view{VIEW}-"
            + hashlib.sha256(np.random.default_rng(0).standard_normal(8).tobytes())
            .hexdigest()[:8])


@dataclass(frozen=True)
class QueryWatch:
    """How each client's queries are watched (``threshold``: set by :func:`calibrate`)."""

    query_k: int = option(5, "earlier queries of the client a new query is compared with")
    query_history: int = option(1000, "queries kept per client")
    query_ttl_s: float = option(86400.0, "seconds a query stays in its client's history")
    query_false_alarm: float = option(0.001, "false-alarm rate per benign query the "
                                             "threshold is calibrated to")
    query_eps: float | None = option(
        None, "the L∞ radius of the attacks to watch for (e.g. 0.3 or 8/255): a query is a "
              "detection when view_k earlier ones lie within 2ε of it in the pixel view "
              "— the ball every query of one attack stays in — and the calibrated thresholds "
              "are not used (fewer false alarms on distinct images); default: both views "
              "calibrated",
        parse=options.strength)
    query_view_k: int | None = option(
        None, "earlier queries within the pixel view's threshold that make a detection "
              "(default: query_k): a search inside one ε-ball gets this many fresh answers "
              "there; fewer take more distinct images for earlier ones (on validation MNIST "
              "digits, per distinct image: 1: 4%, 2: 1.3%, 5: 0.04%)")
    # moves a query is aligned by before it is compared with its client's history (pixels, both
    # axes): a query moved by up to this many is as near its earlier ones as unmoved, so moving
    # every query (random shifts, a jittering camera) leaves the ball no more; with query_eps
    # only (a calibrated threshold was measured unmoved); chosen on validation traffic
    # (benchmarks/choose_query_shift.py)
    query_shift: int = option(
        2, "pixels a query is moved by, both ways on both axes, to align it with its client's "
           "earlier queries before the ε-ball test (of the image pooled to at most 32×32; "
           "with query_eps; at most 2; 0: off)")
    # crops of the query resized back (a zoom, which no shift undoes: a blinded attacker that
    # crops every query, a camera that zooms), beside the shifts; chosen on validation traffic
    # (benchmarks/choose_query_shift.py)
    query_crop: int = option(
        2, "pixels a query is cropped by on each side (0 to this many on each of its four "
           "sides) and resized back, to align it with its client's earlier queries before the "
           "ε-ball test, beside the shifts (of the image pooled to at most 32×32; with "
           "query_eps; at most 2; 0: off)")
    query_global: int = option(5000, "newest queries of every client kept in the account-"
                                     "oblivious index (a query near-copying another key's "
                                     "links the keys); 0: off")
    threshold: float | None = option(None, "mean distance below which a query is a detection "
                                           "(calibrated)", cli=False)
    global_threshold: float | None = option(None, "the same against the account-oblivious "
                                                  "index (calibrated for its size)", cli=False)
    view_threshold: float | None = option(None, "L∞ distance in the pixel view within which "
                                                "query_k earlier queries make a detection "
                                                "(calibrated)", cli=False)
    global_view_threshold: float | None = option(None, "the same against the global index",
                                                 cli=False)
    encoding: str = option(ENCODING, "the encoding the threshold was calibrated for",
                           cli=False)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "query_k", "query_history")
        if self.query_view_k is not None:
            check_at_least(self, 1, "query_view_k")
        if max(self.query_k, self.view_k) > self.query_history:
            raise InputError(f"query_k ({self.query_k}) and query_view_k ({self.view_k}) "
                             f"cannot exceed the history ({self.query_history})")
        check_at_least(self, 0, "query_global", "query_shift", "query_crop")
        for name, most in (("query_shift", SHIFT), ("query_crop", CROP)):
            if getattr(self, name) > most:
                raise InputError(f"{name} can be at most {most} (pixels), got "
                                 f"{getattr(self, name)}")
        if 0 < self.query_global < self.query_k:
            raise InputError(f"query_global ({self.query_global}) must be 0 (off) or at least "
                             f"query_k ({self.query_k})")
        check_fraction("query_false_alarm", self.query_false_alarm)
        if not 0 < self.query_ttl_s < math.inf:
            raise InputError(f"query_ttl_s must be a finite number > 0, got "
                             f"{self.query_ttl_s!r}")
        if self.query_eps is not None and not 0 < self.query_eps <= 1:
            raise InputError(f"query_eps must be in (0, 1], got {self.query_eps!r}")
        for name in ("threshold", "global_threshold", "view_threshold",
                     "global_view_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")

    @property
    def view_k(self) -> int:
        """Earlier queries within the pixel view's threshold that make a detection."""
        return self.query_k if self.query_view_k is None else self.query_view_k

    @property
    def linking(self) -> bool:
        """Whether queries are also compared across clients (the global index)."""
        return self.query_global > 0 and (self.global_threshold is not None
                                          or self.global_view_threshold is not None)

    @property
    def shift(self) -> int:
        """Pixels a query is aligned by against its client's history (0 without query_eps)."""
        return self.query_shift if self.query_eps is not None else 0

    @property
    def crop(self) -> int:
        """Pixels a side a query is cropped by to align it (0 without query_eps)."""
        return self.query_crop if self.query_eps is not None else 0

    def windows(self, x: torch.Tensor) -> np.ndarray | None:
        """The images' moved windows the alignment compares (:func:`moves`; None where it is
        off or their views are their pixels)."""
        return moves(x, self.shift, self.crop) if self.shift or self.crop else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def view_grid(values: int) -> tuple[int, int, int] | None:
    """The ``(channels, height, width)`` of a pixel view of ``values`` numbers: a grey square
    (``values`` a square) or a colour one (three squares); None for any other (a non-square
    image, whose view is not aligned by shifts). The two cannot be confused: 3·a² is never a
    square."""
    side = math.isqrt(values)
    if side * side == values:
        return 1, side, side
    side = math.isqrt(values // 3)
    if values % 3 == 0 and side * side == values // 3:
        return 3, side, side
    return None


def encode(x: torch.Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [0, 1] → float16 codes ``(N, DIMS + V)``, two views of each
    image: first, the image (average-pooled to at most ``SIDE`` × ``SIDE``) minus its mean,
    scaled to unit length and projected by a fixed random matrix to ``DIMS`` numbers, so
    distances are kept and brightness and contrast cancel (a blank image projects to zeros);
    then its pixels, average-pooled to at most ``VIEW`` values (the *pixel view*: any
    perturbation within ε in L∞ stays within ε there, averaging cannot enlarge it)."""
    z = _pooled(x)
    a = z.flatten(1).numpy()  # NumPy from here: cheaper than torch on one small image
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    a = np.where(norm > 1e-6, a / np.maximum(norm, 1e-6), 0).astype(np.float32)
    # one image at a time: BLAS rounds a batch's product differently from one row's, and a
    # code must not depend on what else its batch held (the very same image is told by it)
    projection = _projection(a.shape[1])
    proj = (np.stack([row @ projection for row in a]) if len(a)
            else np.zeros((0, projection.shape[1]), dtype=np.float32))
    return np.concatenate([proj, _view(z).flatten(1).numpy()], axis=1).astype(np.float16)


def moves(x: torch.Tensor, most: int = SHIFT, crop: int = 0) -> np.ndarray | None:
    """For images whose pixel view is pooled (colour, or larger than 32×32 grey): the interior
    of the pixel view (``SHIFT`` cells in from every side) of each image moved by each move of
    :func:`axis_moves` — shifts of up to ``most`` pixels and crops of up to ``crop`` pixels a
    side resized back, of the image pooled to at most ``SIDE`` × ``SIDE``, on both axes — as
    float16 numbers in float32: ``(N, moves, I)``, unmoved first. A move of a pixel is a
    fraction of a pooled view's cell, so the query is moved before it is pooled; None where
    the view is its pixels (its cells are the pixels: :func:`view_moves` moves the view
    itself, the same numbers) or not a square grid."""
    z = _pooled(x)
    view = _view(z)
    c, h, w = view.shape[1:]
    if view.shape[-2:] == z.shape[-2:] or view_grid(c * h * w) is None:
        return None
    out = _moved(z.numpy(), (h, w), most, crop)
    # unmoved: the stored view's own interior to the bit (the products round otherwise)
    out[:, 0] = view[:, :, SHIFT:h - SHIFT, SHIFT:w - SHIFT].flatten(1).numpy()
    return out.astype(np.float16).astype(np.float32)


def view_moves(views: np.ndarray, most: int, crop: int = 0) -> np.ndarray:
    """Pixel views (``(N, V)``, a square grid) moved as :func:`moves` moves an image, their
    cells taken for pixels: ``(N, moves, I)`` — for a view that is its image's pixels (where
    :func:`moves` gives None), the image's moves themselves."""
    grid = view_grid(views.shape[1])
    assert grid is not None
    c, h, w = grid
    return _moved(np.asarray(views, np.float32).reshape(len(views), c, h, w), (h, w), most,
                  crop)


def axis_moves(most: int, crop: int = 0) -> list[tuple[int, int, int]]:
    """The moves of one axis, unmoved first: ``(d, 0, 0)`` a shift by ``d`` pixels (0, −1, 1,
    −2, 2, …, up to ``most``), then ``(0, t, b)`` a crop of ``t`` pixels before and ``b``
    after, resized back (every ``t, b`` up to ``crop``, not both 0). A query's moves are every
    pair of them, one per axis (rows first): shifts and crops of each axis alone, and a crop
    of one axis with a shift of the other (a zoom off centre)."""
    steps = [0, *[d for m in range(1, most + 1) for d in (-m, m)]]
    return ([(d, 0, 0) for d in steps]
            + [(0, t, b) for t in range(crop + 1) for b in range(crop + 1) if t or b])


@functools.lru_cache(maxsize=32)
def _axis_operators(n: int, cells: int, most: int, crop: int) -> np.ndarray:
    """One axis's moves (:func:`axis_moves`) of ``n`` pixels, each followed by the pooling to
    ``cells`` (the pixel view's) and cut to the view's interior, as matrices: ``(moves,
    cells - 2 SHIFT, n)``. A shift repeats the edge; a crop is resized back as torch's
    bilinear resize (``align_corners=False``) does, one axis at a time (bilinear is a
    product of two linear ones), and so is the pooling (the mean over a product of
    intervals)."""
    eye = torch.eye(n, dtype=torch.float64)[None]
    pool = F.adaptive_avg_pool1d(eye, cells)[0].T.numpy()[SHIFT:cells - SHIFT]  # (I, n)
    out = []
    for d, t, b in axis_moves(most, crop):
        if t or b:  # [j, i]: input pixel j's weight in output pixel i
            m = F.interpolate(eye[:, :, t:n - b], size=n, mode="linear",
                              align_corners=False)[0].T.numpy()
        else:
            m = np.zeros((n, n))
            m[np.arange(n), np.clip(np.arange(n) + d, 0, n - 1)] = 1
        out.append(pool @ m)
    return np.stack(out).astype(np.float32)


def _moved(z: np.ndarray, cells: tuple[int, int], most: int, crop: int) -> np.ndarray:
    """Images ``(N, C, H, W)`` moved each way (every pair of the axes' moves, rows first),
    pooled to ``cells`` and cut to the interior: ``(N, moves, C · I)``. Two matrix products
    for the whole batch (each axis's operators stacked), not one resize per move."""
    n, c, hh, ww = z.shape
    rows = _axis_operators(hh, cells[0], most, crop)  # (My, h', H)
    cols = _axis_operators(ww, cells[1], most, crop)  # (Mx, w', W)
    my, h, _ = rows.shape
    mx, w, _ = cols.shape
    # rows: (My·h', H) @ (H, N·C·W) → (My, h', N, C, W)
    a = (rows.reshape(my * h, hh) @ z.transpose(2, 0, 1, 3).reshape(hh, n * c * ww))
    a = a.reshape(my, h, n, c, ww).transpose(2, 0, 3, 1, 4)  # (N, My, C, h', W)
    # columns: (N·My·C·h', W) @ (W, Mx·w') → (N, My, C, h', Mx, w')
    b = (a.reshape(-1, ww) @ cols.transpose(2, 0, 1).reshape(ww, mx * w)).reshape(
        n, my, c, h, mx, w)
    return np.ascontiguousarray(b.transpose(0, 1, 4, 2, 3, 5)).reshape(n, my * mx, c * h * w)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Images as the encoding reads them: float on the CPU, average-pooled to at most
    ``SIDE`` × ``SIDE``."""
    if x.dim() != 4:
        raise InputError(f"encode takes a batch (N, C, H, W), got shape {tuple(x.shape)}")
    z = x.detach().float().cpu()
    if z.shape[-2] > SIDE or z.shape[-1] > SIDE:
        z = F.adaptive_avg_pool2d(z, (min(SIDE, z.shape[-2]), min(SIDE, z.shape[-1])))
    return z


def _view(z: torch.Tensor) -> torch.Tensor:
    """The pixel view of pooled images: their pixels, average-pooled to at most ``VIEW``
    values."""
    if z.shape[1] * z.shape[2] * z.shape[3] <= VIEW:
        return z
    side = max(1, math.isqrt(VIEW // z.shape[1]))
    return F.adaptive_avg_pool2d(z, (min(side, z.shape[-2]), min(side, z.shape[-1])))


@functools.lru_cache(maxsize=8)
def _projection(d: int) -> np.ndarray:
    """The fixed ``(d, DIMS)`` Gaussian projection (seeded: every server and replica encodes a
    query alike), scaled so that it keeps lengths on average."""
    return (np.random.default_rng(0).standard_normal((d, DIMS)) / math.sqrt(DIMS)).astype(
        np.float32)


def split(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes' two views as float32: the projection and the pixel view (None for codes of
    ``DIMS`` numbers or fewer, which have only the first)."""
    c = np.asarray(codes, dtype=np.float32)
    if c.shape[-1] <= DIMS:
        return c, None
    return c[..., :DIMS], c[..., DIMS:]


def distances(history: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The L2 distances ``(len(codes), len(history))`` between codes and history rows."""
    h = np.asarray(history, dtype=np.float32).reshape(-1, codes.shape[1])
    q = np.asarray(codes, dtype=np.float32)
    d2 = (q * q).sum(1)[:, None] + (h * h).sum(1)[None, :] - 2 * q @ h.T
    return np.sqrt(np.maximum(d2, 0))


def mean_knn(history: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """For each code, its mean L2 distance to its ``k`` nearest rows of ``history`` (NaN while
    the history holds fewer than ``k``)."""
    d = distances(history, codes)
    if d.shape[1] < k:
        return np.full(len(codes), np.nan)
    return np.partition(d, k - 1, axis=1)[:, :k].mean(1)


def calibrate(codes: np.ndarray, watch: QueryWatch, seed: int = 0) -> QueryWatch:
    """``watch`` with the thresholds that flag a share ``query_false_alarm`` of benign queries:
    each of ``codes`` (distinct held-out images) is compared with a history of
    ``watch.query_history`` others drawn at random (the per-client thresholds) and with one of
    ``watch.query_global`` others (the global index's, which compares a query with more
    queries and so needs smaller thresholds; both capped by the images there are); each
    threshold is that quantile of the mean L2 distance to the ``query_k`` nearest projections,
    and of the L∞ distance to the ``view_k``-th nearest pixel view."""
    n = len(codes)
    if watch.query_eps is not None:  # the ball of the threat model, float16's rounding beside
        ball = 2 * watch.query_eps + 2 ** -10
        return QueryWatch(**{**asdict(watch), "threshold": None, "global_threshold": None,
                             "view_threshold": ball,
                             "global_view_threshold": ball if watch.query_global else None})
    if n < watch.query_k + 2:
        raise InputError(f"calibrating the query watch needs more than {watch.query_k + 1} images, "
                         f"got {n}")
    out = dict(zip(("threshold", "view_threshold"),
                   _quantiles(codes, watch.query_history, watch, seed), strict=True))
    if watch.query_global:
        out.update(zip(("global_threshold", "global_view_threshold"),
                       _quantiles(codes, watch.query_global, watch, seed + 1), strict=True))
    return QueryWatch(**{**asdict(watch), **out})


VIEW_ROWS = 2000  # calibration images the pixel view's thresholds are measured on (at most)


def _quantiles(codes: np.ndarray, size: int, watch: QueryWatch, seed: int
               ) -> tuple[float, float | None]:
    n, k, kv = len(codes), watch.query_k, watch.view_k
    rng = np.random.default_rng(seed)
    proj, view = split(codes)
    stats, vstats = np.empty(n), np.full(n, np.nan)
    for start in range(0, n, 256):
        rows = np.arange(start, min(n, start + 256))
        others = rng.choice(n - 1, size=min(size, n - 1), replace=False)
        for r in rows:
            pick = others + (others >= r)  # any row but r itself
            stats[r] = mean_knn(proj[pick], proj[r][None], k)[0]
            if view is not None and r < VIEW_ROWS:
                vstats[r] = np.partition(np.abs(view[pick] - view[r]).max(1), kv - 1)[kv - 1]
    q = watch.query_false_alarm
    return (float(np.quantile(stats, q)),
            None if view is None else float(np.nanquantile(vstats, q)))


__all__ = ["CROP", "DIMS", "ENCODING", "SHIFT", "SIDE", "VIEW", "QueryWatch", "axis_moves",
           "calibrate", "distances", "encode", "mean_knn", "moves", "split",
           "view_grid", "view_moves"]
