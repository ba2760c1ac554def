"""FGSM at 5 strengths vs. 1 strength (SPEC A1: one gradient serves every strength).

Also times 5 separate FGSM calls, the cost that sharing the gradient avoids.
Run: ``python benchmarks/bench_fgsm.py``.
"""

from __future__ import annotations

import torch
from common import save, summarise, time_interleaved

from advguard.attacks import fgsm
from advguard.data import load_dataset
from advguard.models import build_model

STRENGTHS = [0.06, 0.12, 0.18, 0.24, 0.3]


def main(repeats: int = 15) -> dict:
    data = load_dataset("mnist", "test", limit=1000)
    x, y = data.x, data.y
    out = {}
    for arch in ("mlp3", "lenet5"):
        torch.manual_seed(0)
        model = build_model(arch, "mnist").eval()
        times = time_interleaved({
            "one_strength": lambda: fgsm(model, x, y, 0.3),
            "five_strengths_one_call": lambda: fgsm(model, x, y, STRENGTHS),
            "five_separate_calls": lambda: [fgsm(model, x, y, e) for e in STRENGTHS],
        }, repeats)
        out[arch] = summarise(times, "one_strength")
        r = out[arch]
        print(f"{arch}: 5 strengths / 1 strength = "
              f"{r['five_strengths_one_call']['ratio_to_one_strength']:.2f}x "
              f"(5 separate calls: {r['five_separate_calls']['ratio_to_one_strength']:.2f}x)")
    path = save("fgsm_strengths", {"batch": 1000, "dataset": "mnist", "repeats": repeats,
                                   "strengths": STRENGTHS, "results": out})
    print(f"written {path}")
    return out


if __name__ == "__main__":
    main()
