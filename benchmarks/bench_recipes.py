"""Cost of the white-box training recipes, side by side in one run on real MNIST.

Two measures for each recipe as ``benchmarks/recipe_study.py`` trains it: forward-backward
passes per training example over the whole training (counted by
:meth:`advguard.training.Recipe.passes`; the forward passes without a gradient — success
checks, TRADES' clean reference — counted beside them by :meth:`~advguard.training.Recipe.checks`),
and wall time — one epoch over the same 3,000 images
(same small CNN, fresh weights each time, repeats interleaved so machine noise hits every
recipe alike) times the recipe's epochs. Both are reported as ratios to PGD-40 adversarial
training for 10 epochs, the baseline the AutoAttack goal is judged against (≤ 1/10).

Run: ``python benchmarks/bench_recipes.py``.
"""

from __future__ import annotations

import torch
from common import save, summarise, time_interleaved

from advguard.data import load_dataset
from advguard.models import build_model
from advguard.training import WhiteBox, get_recipe, train

BASELINE = "pgd-at, 0.3, 10 epochs"
# name: (recipe, strengths, epochs, weight averaging)
RUNS = {
    "fgsm (paper), {0.2,0.3,0.4}, 10 epochs": ("fgsm", (0.2, 0.3, 0.4), 10, 0.0),
    "fgsm-rs, 0.3, 10 epochs": ("fgsm-rs", (0.3,), 10, 0.0),
    "fgsm-rs, {0.2,0.3,0.4} sampled, 10 epochs": ("fgsm-rs", (0.2, 0.3, 0.4), 10, 0.0),
    "fgsm-rs, {0.2,0.3,0.4} sampled, 20 epochs, EMA": ("fgsm-rs", (0.2, 0.3, 0.4), 20, 0.999),
    "n-fgsm, {0.2,0.3,0.4} sampled, 20 epochs": ("n-fgsm", (0.2, 0.3, 0.4), 20, 0.0),
    "pgd-3, {0.2,0.3,0.4} sampled, 10 epochs": ("pgd-3", (0.2, 0.3, 0.4), 10, 0.0),
    "pgd-3, {0.2,0.3,0.4} sampled, 10 epochs, EMA": ("pgd-3", (0.2, 0.3, 0.4), 10, 0.999),
    "trades, 0.3, 10 epochs": ("trades", (0.3,), 10, 0.0),
    "trades, {0.2,0.3,0.4} sampled, 10 epochs": ("trades", (0.2, 0.3, 0.4), 10, 0.0),
    "mart, {0.2,0.3,0.4} sampled, 10 epochs": ("mart", (0.2, 0.3, 0.4), 10, 0.0),
    "trades, 0.3, 34 epochs": ("trades", (0.3,), 34, 0.0),
    "trades, {0.2,0.3,0.4} sampled, 34 epochs": ("trades", (0.2, 0.3, 0.4), 34, 0.0),
    BASELINE: ("pgd-at", (0.3,), 10, 0.0),
}


def main(train_size: int = 3000, repeats: int = 3) -> dict:
    data = load_dataset("mnist", "train", limit=train_size)

    def one_epoch(name: str) -> None:
        recipe_name, strengths, _, average = RUNS[name]
        recipe = get_recipe(recipe_name)
        torch.manual_seed(0)
        model = build_model("small-cnn", "mnist")
        train(model, data, recipe.mix(strengths), WhiteBox(recipe.attack),
              recipe.config(epochs=1, average=average), progress=False)

    times = time_interleaved({name: (lambda n=name: one_epoch(n)) for name in RUNS}, repeats)
    epoch = summarise(times, BASELINE)
    base_epochs = RUNS[BASELINE][2]
    base_passes = get_recipe(RUNS[BASELINE][0]).passes(RUNS[BASELINE][1], base_epochs)
    results = {}
    for name, (recipe, strengths, epochs, _) in RUNS.items():
        passes = get_recipe(recipe).passes(strengths, epochs)
        checks = get_recipe(recipe).checks(strengths, epochs)
        wall = epoch[name]["median_s"] * epochs
        results[name] = {
            "epoch_median_s": epoch[name]["median_s"], "epoch_min_s": epoch[name]["min_s"],
            "epochs": epochs, "passes_per_example": passes, "checks_per_example": checks,
            "passes_ratio_to_pgd_at": passes / base_passes,
            "wall_ratio_to_pgd_at": wall / (epoch[BASELINE]["median_s"] * base_epochs)}
        print(f"{name:<48} {passes:4d} passes (+{checks} checks) = "
              f"{results[name]['passes_ratio_to_pgd_at']:.3f}x, "
              f"wall {results[name]['wall_ratio_to_pgd_at']:.3f}x PGD-AT", flush=True)
    path = save("recipes", {"dataset": "mnist", "model": "small-cnn", "train_size": train_size,
                            "repeats": repeats, "baseline": BASELINE, "results": results})
    print(f"written {path}")
    return results


if __name__ == "__main__":
    main()
