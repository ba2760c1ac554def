"""FGSM (L∞) and FGM (L2) at 5 strengths vs. 1 strength (SPEC A1: one gradient serves every
strength of a call). Also times 5 separate calls, the cost that sharing the gradient avoids.
Run: ``python benchmarks/bench_fgsm.py``; writes ``benchmarks/results/fgsm_strengths.json``
and ``fgm_strengths.json``.
"""

from __future__ import annotations

import torch
from common import save, summarise, time_interleaved

from advguard.attacks import FGM, FGSM, Attack
from advguard.data import load_dataset
from advguard.models import build_model

ATTACKS: dict[str, tuple[Attack, list[float]]] = {
    "fgsm": (FGSM(), [0.06, 0.12, 0.18, 0.24, 0.3]),
    "fgm": (FGM(), [0.5, 1.0, 1.5, 2.0, 3.0]),  # L2
}


def one(name: str, repeats: int) -> dict:
    attack, strengths = ATTACKS[name]
    data = load_dataset("mnist", "test", limit=1000)
    x, y = data.x, data.y
    out = {}
    for arch in ("mlp3", "lenet5"):
        torch.manual_seed(0)
        model = build_model(arch, "mnist").eval()
        times = time_interleaved({
            "one_strength": lambda: attack(model, x, y, strengths[-1]),
            "five_strengths_one_call": lambda: attack(model, x, y, strengths),
            "five_separate_calls": lambda: [attack(model, x, y, e) for e in strengths],
        }, repeats)
        out[arch] = summarise(times, "one_strength")
        r = out[arch]
        print(f"{name} {arch}: 5 strengths / 1 strength = "
              f"{r['five_strengths_one_call']['ratio_to_one_strength']:.2f}x "
              f"(5 separate calls: {r['five_separate_calls']['ratio_to_one_strength']:.2f}x)")
    path = save(f"{name}_strengths", {"batch": 1000, "dataset": "mnist", "repeats": repeats,
                                      "norm": attack.threat.name, "strengths": strengths,
                                      "results": out})
    print(f"written {path}")
    return out


def main(repeats: int = 15) -> dict:
    return {name: one(name, repeats) for name in ATTACKS}


if __name__ == "__main__":
    main()
