"""Banks of over a million vectors: exact search vs FAISS IVF-Flat and IVF-PQ, side by side.

The bank holds real deep features (LeNet-5 of the MNIST detection run, last conv block, PCA +
whitening) of the 55,000 training images and 18 augmented copies of each (seeded random
rotation ±10°, shift ±2 px, scale 0.9–1.1): 1,045,000 vectors, extracted and added in chunks of
10,000 images. For each index: build time, memory, queries/s and recall@k against the exact
search (k = 1000, the 2,000 query digits of the detection run), and the detection paper's EER
accuracy (PCA + whitening, DW-kNN; FGSM, L-BFGS and aggregated negatives of the run) with the
exact bank replaced by each.

    python benchmarks/bench_bank.py --run-dir runs/detect-mnist
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import save

from advguard.data import load_dataset, train_val_split
from advguard.detection import KNNBank, extract_features
from advguard.evaluation import eer_accuracy
from advguard.io import load_tensors
from advguard.models import load_model

COPIES, CHUNK, K = 18, 10_000, 1000
INDEXES = {"flat": {}, "ivf": {"nlist": 1024, "nprobe": 16},
           "ivfpq": {"nlist": 1024, "nprobe": 16, "pq_m": 8}}


def augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Random rotation, shift and scale of each image (bilinear, zero padding)."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / 14)  # ±2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False).clamp_(0, 1)


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/detect-mnist"))
    args = parser.parse_args()
    model, _ = load_model(args.run_dir / "checkpoints" / "model.safetensors")
    full = load_dataset("mnist", "train")
    tr, _ = train_val_split(len(full), 5000, 0)
    train = full.subset(tr)
    t0 = time.perf_counter()
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    for copy in range(COPIES + 1):
        for s in range(0, len(train), CHUNK):
            x = train.x[s:s + CHUNK]
            if copy:
                x = augment(x, seed=copy * 1000 + s // CHUNK)
            chunks.append((extract_features(model, x)[0].numpy(), train.y[s:s + CHUNK].numpy()))
    extract_s = time.perf_counter() - t0
    n = sum(len(f) for f, _ in chunks)
    print(f"{n} vectors of {chunks[0][0].shape[1]} dims extracted in {extract_s:.1f} s")

    test = load_dataset("mnist", "test", limit=2000)
    q_feat, q_pred = extract_features(model, test.x)
    right = q_pred.numpy() == test.y.numpy()
    fgsm_x = load_tensors(args.run_dir / "checkpoints" / "model-fgsm.safetensors")[0]["x"]
    lb = load_tensors(args.run_dir / "checkpoints" / "model-lbfgs.safetensors")[0]
    sets = {"authentic": (q_feat.numpy()[right], q_pred.numpy()[right])}
    for name, x_adv, ok in (("fgsm", fgsm_x, None), ("lbfgs", lb["x"], lb["success"].numpy())):
        f, p = extract_features(model, x_adv)
        m = len(x_adv)
        fooled = (p.numpy() != test.y.numpy()[:m]) & right[:m]
        if ok is not None:
            fooled &= ok
        sets[name] = (f.numpy()[fooled], p.numpy()[fooled])

    results: dict[str, dict[str, float]] = {}
    exact_ids = None
    for kind, kw in INDEXES.items():
        before = rss_mb()
        t0 = time.perf_counter()
        det = KNNBank(k=K, index=kind, **kw).fit_chunks(iter(chunks))
        build_s = time.perf_counter() - t0
        grown = rss_mb() - before
        z = det.preprocessor_.transform(sets["authentic"][0])
        t0 = time.perf_counter()
        ids = det.index_.search_ids(z, K)
        qps = len(z) / (time.perf_counter() - t0)
        if exact_ids is None:
            exact_ids = ids
        recall = float(np.mean([len(np.intersect1d(a, b)) / K
                                for a, b in zip(exact_ids, ids, strict=True)]))
        s = {name: det.scores(f, p) for name, (f, p) in sets.items()}
        neg = np.concatenate([s["fgsm"], s["lbfgs"]])
        results[kind] = {
            **kw, "vectors": len(det.index_), "build_s": build_s,
            "bank_mb": det.index_.nbytes / 2 ** 20, "rss_growth_mb": grown,
            "queries_per_s": qps, f"recall_at_{K}": recall,
            "eer_accuracy": {"fgsm": eer_accuracy(s["authentic"], s["fgsm"]),
                             "lbfgs": eer_accuracy(s["authentic"], s["lbfgs"]),
                             "aggregated": eer_accuracy(s["authentic"], neg)}}
        print(kind, results[kind])
        del det
    save("bank", {"bank": {"vectors": n, "copies_per_image": COPIES, "chunk_images": CHUNK,
                           "extract_s": extract_s, "k": K, "queries": int(right.sum()),
                           "preprocessing": "pca-whiten", "weighting": "dwknn"},
                  "indexes": results})


if __name__ == "__main__":
    main()
