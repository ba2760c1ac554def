"""Training recipes under AutoAttack on MNIST at ε = 0.3, every one run from the CLI.

For each candidate: ``advguard train`` (the full 60,000-image training set, seed 0, the small
CNN), ``advguard evaluate --attack white-box-pgd`` (PGD-40 with 5 restarts, step 2.5·ε/40, on
the first 1,000 test images at every grid strength) and ``advguard audit --only-autoattack``
(AutoAttack standard at ε = 0.3 on the same 1,000 images). Each step writes its file into
``OUT/NAME/`` and is skipped when the file exists, so the study resumes where it stopped.
Training cost is counted as forward-backward passes per training example
(:meth:`advguard.training.Recipe.passes`) and as the training wall time.

Run: ``python benchmarks/recipe_study.py OUT [NAME ...]`` (default: every candidate).
Results: ``OUT/summary.json`` and one line per candidate on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from advguard.io import read_metadata, write_json
from advguard.training import get_recipe

EPS = 0.3
TEST_IMAGES = 1000

# name: (recipe, strengths, epochs, extra `advguard train` options)
CANDIDATES: dict[str, tuple[str, str, int, list[str]]] = {
    "pgd-at": ("pgd-at", "0.3", 10, []),
    "fgsm-rs-0.3": ("fgsm-rs", "0.3", 10, []),
    "fgsm-rs-mixed": ("fgsm-rs", "0.2,0.3,0.4", 10, []),
    "fgsm-rs-mixed-20": ("fgsm-rs", "0.2,0.3,0.4", 20, []),
    "fgsm-rs-mixed-20-avg": ("fgsm-rs", "0.2,0.3,0.4", 20, ["--average", "0.999"]),
    "fgsm-rs-mixed-20-ramp-avg": ("fgsm-rs", "0.2,0.3,0.4", 20,
                                  ["--ramp", "0.3", "--average", "0.999"]),
    "n-fgsm-mixed-20": ("n-fgsm", "0.2,0.3,0.4", 20, []),
    "n-fgsm-mixed-20-avg": ("n-fgsm", "0.2,0.3,0.4", 20, ["--average", "0.999"]),
    "pgd-3-mixed-10-ramp": ("pgd-3", "0.2,0.3,0.4", 10, ["--ramp", "0.3"]),
    "pgd-3-mixed-10-ramp-avg": ("pgd-3", "0.2,0.3,0.4", 10, ["--ramp", "0.3", "--average",
                                                            "0.999"]),
}


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run(["advguard", *args], check=True, stdout=f, stderr=subprocess.STDOUT)


def study(out: Path, name: str) -> dict:
    recipe, strengths, epochs, extra = CANDIDATES[name]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    model, log = d / "model.safetensors", d / "log.txt"
    if not model.exists():
        _run(["train", str(model), "--model", "small-cnn", "--recipe", recipe, "--strengths",
              strengths, "--epochs", str(epochs), "--seed", "0", "-q", *extra], log)
    if not (d / "pgd.json").exists():
        _run(["evaluate", str(model), "--attack", "white-box-pgd", "--pgd-steps", "40",
              "--pgd-restarts", "5", "--test-limit", str(TEST_IMAGES), "--out",
              str(d / "pgd.json"), "-q"], log)
    if not (d / "autoattack.json").exists():
        _run(["audit", str(model), "--eps", str(EPS), "--only-autoattack", "--test-limit",
              str(TEST_IMAGES), "--out", str(d / "autoattack.json"), "-q"], log)
    meta = read_metadata(model)
    pgd = json.loads((d / "pgd.json").read_text())
    aa = json.loads((d / "autoattack.json").read_text())["autoattack"]
    eps = tuple(float(e) for e in strengths.split(","))
    return {"recipe": recipe, "strengths": list(eps), "epochs": epochs, "options": extra,
            "clean_accuracy_10k": meta["test_accuracy"], "train_seconds": meta["train_seconds"],
            "passes_per_example": get_recipe(recipe).passes(eps, epochs),
            "pgd40x5_curve": dict(zip(map(str, pgd["grid"]), pgd["curve"], strict=True)),
            "pgd40x5_min": min(pgd["curve"]), "autoattack": aa}


def main(out: Path, names: list[str]) -> None:
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in names or list(CANDIDATES):
        summary[name] = study(out, name)
        s = summary[name]
        print(f"{name:<28} clean {100 * s['clean_accuracy_10k']:.2f}  PGD min "
              f"{100 * s['pgd40x5_min']:.1f}  AA {100 * s['autoattack']['robust_accuracy']:.1f}"
              f"  passes {s['passes_per_example']}  train {s['train_seconds']:.0f} s",
              flush=True)
        write_json(summary_path, summary)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
