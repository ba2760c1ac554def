"""How often honest traffic would be told flagged by the watch's flip rule, on validation
images (the training images the guard held out of its bank, as ``choose_policy.py`` reads
them), never the test images the guard benchmarks report.

The rule (``state.watched``): a query the model gives another class than an earlier query
inside its pixel view's ball (2ε in L∞, aligned by shifts of up to ``query_shift`` pixels and
crops of up to ``query_crop`` against the newest 128 of its client's history and of the global
index, unmoved against the rest) is told flagged. It has no setting of its own; this measures
what it costs:

* **distinct images**: each of 1,000 validation images against 100 and 1,000 others drawn at
  random (a client's history, aligned with all of them: more than the service aligns) and
  against 5,000 (the global index, unmoved): the share
  with any image inside its ball, and with one of another class (the rule's false positives);
* **cameras**: 50 validation scenes, 100 frames each, fixed (sensor noise σ 0.02) or jittering
  (shifted by up to 2 pixels, zeros in, as ``bench_honest.py``'s camera): the share of frames
  that the model gives another class than an earlier frame inside their ball (an upper bound
  on the frames the rule flags: a frame the watch answers as an earlier one is told flagged
  only where its class differs from that one's).

    python benchmarks/flip_beside_validation.py --guard-dir runs/guard-mnist
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from choose_query_shift import SIGMA, moved
from common import guard_parser, save, validation_images

from advguard.serve import Guard
from advguard.serve.matching import Bank
from advguard.serve.queries import QueryWatch, encode


def inside(bank: Bank, query: Bank, watch: QueryWatch, aligned: bool,
           windows: np.ndarray | None) -> np.ndarray:
    """The rows of ``bank`` inside ``query``'s ball (``aligned``: by the watch's moves)."""
    assert watch.view_threshold is not None
    rows = np.arange(len(bank))
    dv = bank.linf(query, 0, rows, watch.view_threshold)
    if aligned and (watch.shift or watch.crop):
        dv = np.minimum(dv, bank.aligned(query, 0, rows, watch.view_threshold, watch.shift,
                                         windows, watch.crop))
    return rows[dv < watch.view_threshold]


def classes(guard: Guard, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([guard.verdicts(x[i:i + 500]).predicted for i in range(0, len(x), 500)])


def distinct(guard: Guard, x: torch.Tensor, watch: QueryWatch) -> dict[str, Any]:
    codes, c = encode(x), classes(guard, x)
    windows = watch.windows(x[:1000])
    rng = np.random.default_rng(0)
    out = {}
    for name, size, aligned in (("history-100", 100, True), ("history-1000", 1000, True),
                                ("global-5000", min(5000, len(x) - 1), False)):
        near = other = 0
        for r in range(1000):
            picked = rng.choice(len(codes) - 1, size=size, replace=False)
            picked = picked + (picked >= r)  # any image but r itself
            rows = inside(Bank.of(codes[picked]), Bank.of(codes[r:r + 1]), watch, aligned,
                          None if windows is None else windows[r])
            near += len(rows) > 0
            other += bool((c[picked[rows]] != c[r]).any())
        out[name] = {"any_inside_the_ball": near / 1000, "another_class_inside": other / 1000}
        print(name, out[name], flush=True)
    return out


def cameras(guard: Guard, x: torch.Tensor, watch: QueryWatch) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("fixed", "jittering"):
        flips = frames = 0
        for s in range(50):
            scene = x[s:s + 1]
            shots = torch.cat([((moved(scene, gen, True) if kind == "jittering" else scene)
                                + SIGMA * torch.randn(scene.shape, generator=gen)).clamp(0, 1)
                               for _ in range(100)])
            codes, c = encode(shots), classes(guard, shots)
            windows = watch.windows(shots)
            for i in range(1, len(shots)):
                rows = inside(Bank.of(codes[:i]), Bank.of(codes[i:i + 1]), watch, True,
                              None if windows is None else windows[i])
                flips += bool((c[rows] != c[i]).any())
                frames += 1
        out[kind] = {"frames_beside_another_class": flips / frames}
        print(kind, out[kind], flush=True)
    return out


def main() -> None:
    ap = guard_parser("flip-beside-validation")
    args = ap.parse_args()
    torch.set_num_threads(2)
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    assert watch is not None and watch.view_threshold is not None, "a watch with a pixel view"
    x, _ = validation_images(guard.config.dataset, 5001, args.data_dir)
    with torch.no_grad():
        result = {"distinct": distinct(guard, x, watch), "cameras": cameras(guard, x, watch)}
    save(args.out, {"guard": str(args.guard_dir),
                    "images": f"{guard.config.dataset} training images held out of the bank: "
                              "the first 5,001 of the validation split",
                    "eps": watch.query_eps, "shift": watch.shift, "crop": watch.crop,
                    **result}, args.guard_dir)


if __name__ == "__main__":
    main()
