"""The query watch's encoding and k, chosen on validation traffic (never on the test images
the guard benchmarks report).

Validation traffic on MNIST training images (the last 3,000 of the training file):
* 30 Square streams (torchattacks with the reference settings: margin loss, p_init 0.8,
  ``resc_schedule=False``; ε = 0.3, 150 queries), against the guard's model, every query the
  attack sends recorded;
* 20 honest clients, each sending 5 augmented copies (shift, crop, brightness, noise: the
  augmentations of ``bench_guard.py``) of 20 images.
Each configuration's threshold is calibrated on 2,000 other validation images to the watch's
default false-alarm rate, and the policy's default (5 detections deny) is applied: how many
Square streams are denied, how many succeed before their denial, and how many detections the
honest clients raise. The configurations: the earlier encoding (8×8 average pooling) and the
full-resolution random projection (``advguard.serve.queries.encode``), each at several k.
Last, what the chosen encoding cannot see: the distance between augmented copies of one image,
beside the distance to the nearest of 99 other images.

Run: ``python benchmarks/choose_query_watch.py GUARD_DIR OUT.json`` (GUARD_DIR: a guard fitted
on MNIST, e.g. by ``bench_guard.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from bench_guard import augmented

from advguard.data import load_dataset
from advguard.ensemble import load_any
from advguard.io import write_json
from advguard.serve import queries as Q
from advguard.serve.matching import repeats

DENY_AFTER = 5  # the policy's max_repeats


def pooled8(x: torch.Tensor) -> np.ndarray:
    """The encoding before: 8×8 average pooling, centred, unit length (float16)."""
    z = F.adaptive_avg_pool2d(x.float(), 8).flatten(1)
    z = z - z.mean(1, keepdim=True)
    n = z.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-6, z / n.clamp_min(1e-6), torch.zeros_like(z)).numpy().astype(
        np.float16)


class Recorder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.queries = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries.append(x.detach().clone())
        return self.model(x)


def projection(x: torch.Tensor) -> np.ndarray:
    """The encoding's first view alone (the one this study chose; the pixel view came later,
    chosen in ``choose_flip_limit.py``)."""
    return Q.split(Q.encode(x))[0].astype(np.float16)


def main(guard: Path, out: Path) -> None:
    torch.set_num_threads(1)
    model = load_any(guard / "model.safetensors")[0].eval()
    train = load_dataset("mnist", "train")
    val, val_y = train.x[-3000:], train.y[-3000:]
    streams = []
    for j in range(2000, 2030):
        rec = Recorder(model)
        torchattacks.Square(rec, norm="Linf", eps=0.3, n_queries=150, n_restarts=1, p_init=0.8,
                            loss="margin", resc_schedule=False, seed=0)(val[j:j + 1],
                                                                        val_y[j:j + 1])
        qs = torch.cat(rec.queries)
        with torch.no_grad():
            fooled = (model(qs).argmax(1) != val_y[j]).numpy()
        streams.append((qs, int(np.argmax(fooled)) + 1 if fooled.any() else None))
    honest = [augmented(val[c * 20:(c + 1) * 20], 5, False, c) for c in range(10, 30)]
    result: dict = {"traffic": "MNIST training images 57,000–59,999 (validation)",
                    "square": "torchattacks Square, eps 0.3, 150 queries, reference settings",
                    "deny_after": DENY_AFTER, "configurations": {}}
    for name, enc, k in (("pooled 8x8, k=20 (before)", pooled8, 20),
                         ("pooled 8x8, k=5", pooled8, 5),
                         ("projection, k=20", projection, 20), ("projection, k=10", projection, 10),
                         ("projection, k=5 (chosen)", projection, 5),
                         ("projection, k=3", projection, 3)):
        watch = Q.calibrate(enc(val[:2000]), Q.QueryWatch(query_k=k))
        denied_at, before = [], 0
        for qs, first in streams:
            hits = np.cumsum(repeats(np.zeros((0, 1)), enc(qs), watch))
            at = int(np.argmax(hits >= DENY_AFTER)) + 1 if hits[-1] >= DENY_AFTER else None
            denied_at.append(at)
            before += first is not None and (at is None or first < at)
        detections = [int(repeats(np.zeros((0, 1)), enc(h), watch).sum()) for h in honest]
        row = {"k": k, "threshold": watch.threshold,
               "square_streams": len(streams),
               "square_fooled_within_budget": sum(f is not None for _, f in streams),
               "square_denied": sum(a is not None for a in denied_at),
               "square_fooled_before_denial": int(before),
               "median_queries_to_denial": float(np.median([a for a in denied_at if a]))
               if any(denied_at) else None,
               "honest_queries": sum(len(h) for h in honest),
               "honest_detections": sum(detections),
               "honest_max_detections_per_client": max(detections)}
        result["configurations"][name] = row
        print(name, row, flush=True)
    # what the chosen encoding cannot see: augmented copies of one image vs. distinct images
    copies = projection(augmented(val[:200], 5, False, 0)).astype(np.float32).reshape(200, 5, -1)
    off = ~np.eye(5, dtype=bool)
    within = np.concatenate([Q.distances(c, c)[off] for c in copies])
    codes = projection(val[:200]).astype(np.float32)
    nearest = np.array([Q.distances(np.delete(codes, i, 0)[:99], codes[i:i + 1]).min()
                        for i in range(200)])
    result["augmented_copies"] = {
        "images": 200, "copies": 5,
        "distance_between_copies_median": float(np.median(within)),
        "nearest_of_99_distinct_images_median": float(np.median(nearest))}
    print(result["augmented_copies"])
    write_json(out, result)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
