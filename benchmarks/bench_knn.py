"""Scoring 2,000 queries against a 60,000-vector bank with k = 1000, side by side in one run:
advguard's detector (FAISS exact flat L2) vs. scikit-learn's brute-force ``NearestNeighbors`` vs.
``torch.cdist`` + ``topk``; each then computes the same DW-kNN scores. Features are 256-d (the
PCA-whitened size), Gaussian, seeded. Run: ``python benchmarks/bench_knn.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from common import save, summarise, time_interleaved

from advguard.detection import KNNBank, class_scores

N, Q, D, K = 60000, 2000, 256, 1000


def main(repeats: int = 3) -> dict:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.integers(0, 10, N)
    queries = rng.standard_normal((Q, D)).astype(np.float32)
    predicted = rng.integers(0, 10, Q)

    det = KNNBank(k=K, weighting="dwknn", preprocessing="none").fit(bank, labels)

    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=K, algorithm="brute").fit(bank)
    bank_t, labels_t = torch.from_numpy(bank), torch.from_numpy(labels)

    def sklearn_scores():
        dist, idx = nn_.kneighbors(queries)
        return class_scores(dist ** 2, labels[idx], predicted, "dwknn")

    def torch_scores():
        out = []
        for s in range(0, Q, 500):
            d = torch.cdist(torch.from_numpy(queries[s:s + 500]), bank_t)
            dist, idx = d.topk(K, largest=False)
            out.append(class_scores(dist.numpy() ** 2, labels_t[idx].numpy(),
                                    predicted[s:s + 500], "dwknn"))
        return np.concatenate(out)

    a, b, c = det.scores(queries, predicted), sklearn_scores(), torch_scores()
    agree = {"sklearn": float(np.abs(a - b).max()), "torch": float(np.abs(a - c).max())}
    times = time_interleaved({"advguard_faiss": lambda: det.scores(queries, predicted),
                              "sklearn_brute": sklearn_scores, "torch_cdist_topk": torch_scores},
                             repeats, warmup=1)
    summary = summarise(times, "advguard_faiss")
    bank_mb = det.index_.nbytes / 2 ** 20
    advguard_s = summary["advguard_faiss"]["median_s"]
    sk = summary["sklearn_brute"]["ratio_to_advguard_faiss"]
    print(f"{Q} queries, {N} x {D} bank, k={K}: advguard {advguard_s:.2f} s; "
          f"scikit-learn {sk:.2f}x; "
          f"torch cdist+topk {summary['torch_cdist_topk']['ratio_to_advguard_faiss']:.2f}x; "
          f"bank {bank_mb:.1f} MB; max score difference {max(agree.values()):.2e}")
    path = save("knn", {"bank": N, "queries": Q, "dim": D, "k": K, "bank_mb": bank_mb,
                        "max_score_difference": agree, "results": summary})
    print(f"written {path}")
    return summary


if __name__ == "__main__":
    main()
