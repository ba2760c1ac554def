"""How far the query watch aligns a query with its client's history (``--query-shift``,
``--query-crop``), chosen on validation traffic: the training images the guard held out of its
bank (its seeded validation split, as ``choose_policy.py`` reads it), never the test images
the guard benchmarks report.

For each shift (0, 1, 2 pixels), then each crop beside the largest shift (1, 2 pixels a side),
and a watch at the ε-ball (``--query-eps``):
* **distinct digits taken for an earlier one**: each of 1,000 validation digits scanned against
  a history of 1,000 others drawn at random (as ``calibrate`` draws them), a detection when
  ``view_k`` of them lie within the ball — the false-positive rate per distinct image;
* **a jittering camera's frames answered as an earlier frame**: 50 validation scenes, 100
  frames each, every frame shifted by up to 2 pixels (zeros in) with sensor noise σ 0.02, as
  ``bench_honest.py``'s camera;
* **moved queries of one attack found**: 50 validation digits, 100 queries each inside the
  ε-ball (uniform noise of ±ε on a random half, as the blinded attacker sends) and then moved
  by up to 2 pixels (edges repeated, as ``bench_blackbox.py``'s shift blinding), scanned against
  the earlier ones;
* **cropped queries of one attack found**: the same, each query cropped by 0 to 2 pixels on
  each side and resized back (``bench_blackbox.py``'s crop blinding), and its **cash-in** — one
  unmoved query inside the ball after the 100 cropped ones, as the attacker sends to collect a
  success: the share of cash-ins with an earlier query inside their ball once aligned (what
  the flip rule compares them with) and with ``view_k`` there (answered as an earlier query);
and the time one scan against a history of 1,000 takes. The rule, fixed before the run: the
largest shift, then the largest crop beside it, whose distinct digits are taken for an earlier
one at most 1% of the time.

    python benchmarks/choose_query_shift.py --guard-dir runs/guard-mnist
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import guard_parser, save, validation_images
from threadpoolctl import threadpool_limits

from advguard.serve import Guard
from advguard.serve.matching import Bank, own
from advguard.serve.queries import CROP, SHIFT, QueryWatch, encode

SIGMA = 0.02


def moved(x: torch.Tensor, gen: torch.Generator, zeros: bool) -> torch.Tensor:
    """``x`` (1, C, H, W) shifted by up to 2 pixels each way: zeros in (a camera) or edges
    repeated (the blinded attacker)."""
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    padded = F.pad(x, (2, 2, 2, 2), mode="constant" if zeros else "replicate")
    h, w = x.shape[-2:]
    return padded[..., dy:dy + h, dx:dx + w]


def cropped(x: torch.Tensor, gen: torch.Generator, most: int = 2) -> torch.Tensor:
    """``x`` (1, C, H, W) cropped by 0 to ``most`` pixels on each side and resized back
    (bilinear), as ``bench_blackbox.py``'s crop blinding."""
    t, b, left, r = (int(v) for v in torch.randint(0, most + 1, (4,), generator=gen))
    h, w = x.shape[-2:]
    return F.interpolate(x[..., t:h - b, left:w - r], size=(h, w), mode="bilinear",
                         align_corners=False).clamp(0, 1)


def stream_rate(images: torch.Tensor, watch: QueryWatch) -> tuple[float, float]:
    """Share of a stream's queries (after its first ``view_k``) found against the earlier ones,
    and the seconds a scan took on average."""
    codes, moved = encode(images), watch.windows(images)
    found, spent = 0, 0.0
    for i in range(watch.view_k, len(codes)):
        t = time.perf_counter()
        s = own(Bank.of(codes[:i]), codes[i:i + 1], watch,
                None if moved is None else moved[i:i + 1])
        spent += time.perf_counter() - t
        found += int(s.match[0] >= 0)
    n = len(codes) - watch.view_k
    return found / n, spent / n


def last(images: torch.Tensor, watch: QueryWatch) -> Any:
    """The scan of a stream's last query (a cash-in) against the ones before it."""
    codes, moved = encode(images), watch.windows(images[-1:])
    return own(Bank.of(codes[:-1]), codes[-1:], watch, moved)


def main() -> None:
    ap = guard_parser("query-shift-choice")
    args = ap.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")  # as the service runs the scans (serve.app)
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    assert watch is not None and watch.query_eps is not None, "a guard fitted with --query-eps"
    eps = watch.query_eps
    x, _ = validation_images(guard.config.dataset, 3000, args.data_dir)
    codes = encode(x)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    cams = []
    for s in range(50):
        frames = torch.cat([(moved(x[1000 + s:1001 + s], gen, True)
                             + SIGMA * torch.randn((1, *x.shape[1:]), generator=gen))
                            .clamp(0, 1) for _ in range(100)])
        cams.append(frames)
    attacks, crops = [], []
    for s in range(50):
        img = x[2000 + s:2001 + s]
        qs, cs = [], []
        for _ in range(101):
            half = torch.rand(img.shape, generator=gen) < 0.5
            noise = (torch.rand(img.shape, generator=gen) * 2 - 1) * eps * half
            qs.append(moved((img + noise).clamp(0, 1), gen, False))
            cs.append((img + noise).clamp(0, 1))
        attacks.append(torch.cat(qs[:100]))
        # 100 cropped queries, then the cash-in: one unmoved query inside the ball
        crops.append(torch.cat([*(cropped(c, gen) for c in cs[:100]), cs[100]]))
    rows: dict[str, Any] = {}
    settings = [(shift, 0) for shift in range(SHIFT + 1)] + [(SHIFT, c)
                                                            for c in range(1, CROP + 1)]
    for shift, crop in settings:
        w = replace(watch, query_shift=shift, query_crop=crop)
        hits, spent = 0, 0.0
        moved_x = w.windows(x[:1000])
        for r in range(1000):
            others = rng.choice(len(codes) - 1, size=1000, replace=False)
            bank = Bank.of(codes[others + (others >= r)])  # any digit but r itself
            t = time.perf_counter()
            s = own(bank, codes[r:r + 1], w, None if moved_x is None else moved_x[r:r + 1])
            spent += time.perf_counter() - t
            hits += int(s.found[0])
        cam = [stream_rate(c, w) for c in cams]
        att = [stream_rate(c, w) for c in attacks]
        cut = [stream_rate(c[:100], w) for c in crops]
        cash = [last(c, w) for c in crops]
        name = f"shift-{shift}" + (f"-crop-{crop}" if crop else "")
        rows[name] = {
            "shift": shift, "crop": crop,
            "distinct_taken_for_earlier": hits / 1000,
            "ms_per_scan_of_1000": 1e3 * spent / 1000,
            "camera_frames_answered_as_earlier": float(np.mean([c[0] for c in cam])),
            "cameras_with_under_half_answered": int(sum(c[0] < 0.5 for c in cam)),
            "moved_attack_queries_found": float(np.mean([a[0] for a in att])),
            "cropped_attack_queries_found": float(np.mean([a[0] for a in cut])),
            "cash_ins_beside_a_cropped_query": float(np.mean(
                [len(c.ball[0]) > 0 or c.match[0] >= 0 for c in cash])),
            "cash_ins_answered_as_earlier": float(np.mean([c.match[0] >= 0 for c in cash])),
            "ms_per_stream_scan": 1e3 * float(np.mean([c[1] for c in cam + att + cut]))}
        print(name, rows[name], flush=True)
    ok = [s for s, r in rows.items() if r["distinct_taken_for_earlier"] <= 0.01]
    chosen = max(ok, key=lambda s: (rows[s]["shift"], rows[s]["crop"])) if ok else None
    save(args.out, {"guard": str(args.guard_dir),
                    "images": f"{guard.config.dataset} training images held out of the bank: "
                              f"the first 3,000 of the validation split",
                    "rule": "the largest shift, then the largest crop beside it, whose "
                            "distinct images are taken for an earlier one at most 1% of the "
                            "time",
                    "eps": eps, "view_k": watch.view_k, "settings": rows,
                    "chosen": chosen}, args.guard_dir)


if __name__ == "__main__":
    main()
