"""FGM (L2) at 5 strengths vs. 1 strength: as FGSM (``bench_fgsm.py``), one gradient serves
every strength of a call. Also times 5 separate FGM calls, the cost sharing avoids.
Run: ``python benchmarks/bench_fgm.py``; writes ``benchmarks/results/fgm_strengths.json``.
"""

from __future__ import annotations

import torch
from common import save, summarise, time_interleaved

from advguard.attacks import FGM
from advguard.data import load_dataset
from advguard.models import build_model

STRENGTHS = [0.5, 1.0, 1.5, 2.0, 3.0]


def main(repeats: int = 15) -> dict:
    data = load_dataset("mnist", "test", limit=1000)
    x, y = data.x, data.y
    attack, out = FGM(), {}
    for arch in ("mlp3", "lenet5"):
        torch.manual_seed(0)
        model = build_model(arch, "mnist").eval()
        times = time_interleaved({
            "one_strength": lambda: attack(model, x, y, 3.0),
            "five_strengths_one_call": lambda: attack(model, x, y, STRENGTHS),
            "five_separate_calls": lambda: [attack(model, x, y, e) for e in STRENGTHS],
        }, repeats)
        out[arch] = summarise(times, "one_strength")
        r = out[arch]
        print(f"{arch}: 5 strengths / 1 strength = "
              f"{r['five_strengths_one_call']['ratio_to_one_strength']:.2f}x "
              f"(5 separate calls: {r['five_separate_calls']['ratio_to_one_strength']:.2f}x)")
    path = save("fgm_strengths", {"batch": 1000, "dataset": "mnist", "repeats": repeats,
                                  "norm": "l2", "strengths": STRENGTHS, "results": out})
    print(f"written {path}")
    return out


if __name__ == "__main__":
    main()
