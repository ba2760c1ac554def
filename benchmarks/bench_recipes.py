"""Cost of the white-box training recipes, side by side in one run on real MNIST.

One epoch-slice (the same batches, the same small CNN, fresh weights each time) trained with
every recipe of ``advguard.training.recipes``: the paper's plain FGSM (clean + one copy per
strength), multi-strength random-start FGSM (strengths sampled per example), single-strength
random-start FGSM, and Madry et al.'s PGD-40 adversarial training. Interleaved repeats; the
ratio to PGD-40 AT is the number the white-box goal is judged by (≤ 1/10).

Run: ``python benchmarks/bench_recipes.py``.
"""

from __future__ import annotations

import torch
from common import save, summarise, time_interleaved

from advguard.data import load_dataset
from advguard.models import build_model
from advguard.training import TrainConfig, get_recipe, train

RUNS = {
    "fgsm (paper), {0.2,0.3,0.4}": ("fgsm", (0.2, 0.3, 0.4)),
    "fgsm-rs, {0.2,0.3,0.4} sampled": ("fgsm-rs", (0.2, 0.3, 0.4)),
    "fgsm-rs, 0.3": ("fgsm-rs", (0.3,)),
    "pgd-at (PGD-40), 0.3": ("pgd-at", (0.3,)),
}


def main(train_size: int = 3000, repeats: int = 3) -> dict:
    data = load_dataset("mnist", "train", limit=train_size)

    def run(name: str) -> None:
        recipe = get_recipe(RUNS[name][0])
        torch.manual_seed(0)
        model = build_model("small-cnn", "mnist")
        cfg = TrainConfig(epochs=1, batch_size=recipe.batch_size, lr=recipe.lr,
                          schedule=recipe.schedule)
        train(model, data, recipe.mix(RUNS[name][1]), recipe.source, cfg, progress=False)

    times = time_interleaved({name: (lambda n=name: run(n)) for name in RUNS}, repeats)
    summary = summarise(times, "pgd-at (PGD-40), 0.3")
    for name, row in summary.items():
        print(f"{name:<32} {row['median_s']:7.2f} s  = {row['ratio_to_pgd-at (PGD-40), 0.3']:.3f}"
              " x PGD-40 AT")
    path = save("recipes", {"dataset": "mnist", "model": "small-cnn", "train_size": train_size,
                            "repeats": repeats, "results": summary})
    print(f"written {path}")
    return summary


if __name__ == "__main__":
    main()
