"""Training recipes under AutoAttack, every one run from the CLI: MNIST at ε = 0.3 (the small
CNN) and CIFAR-10 at ε = 8/255 (``resnet-s``).

For each candidate: ``advguard train`` (the whole training set, seed 0),
``advguard evaluate --attack white-box-pgd`` (MNIST: PGD-40 with 5 restarts on the first 1,000
test images at every grid strength; CIFAR-10: PGD-20, one start, on the first 1,000 at 0, 2, 4,
6, 8/255) and ``advguard audit --only-autoattack`` (AutoAttack standard at the target ε on the
first 1,000 MNIST or 500 CIFAR-10 test images). Each step writes its file into ``OUT/NAME/``
and is skipped when the file exists, so the study resumes where it stopped. Training cost is
counted as forward-backward passes per training example
(:meth:`advguard.training.Recipe.passes`), the forward passes without a gradient beside them
(:meth:`advguard.training.Recipe.checks`: success checks, TRADES' clean reference) and as the
training wall time.

Two protocols, recorded in every row as ``chosen_on``:

* ``--protocol validation`` (the accepted one): each candidate trains with ``--hold-out 5000``
  (MNIST; 5,000 training images set aside with a fixed seed) and its PGD curve and AutoAttack
  run on the first 1,000 of those held-out images (``--split val``). Recipes and strengths are
  chosen on these numbers. ``--final NAME ...`` then runs AutoAttack once on all 10,000 test
  images for the chosen candidates (``autoattack_test_10k``, with its standard error).
* ``--protocol test-1000`` (the first study's): everything on the first 1,000 test images;
  choices made on them are not results of record.

Run: ``python benchmarks/recipe_study.py OUT [--protocol validation] [NAME ...]`` (default:
every MNIST candidate); ``... OUT --final [--jobs N] NAME ...`` (N slices at a time, one
thread each); ``... OUT --table`` prints the summary
as a markdown table. Results: ``OUT/summary.json`` and one line per candidate on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from advguard.evaluation import merge_results
from advguard.io import read_metadata, write_json
from advguard.options import strength
from advguard.training import get_recipe

CIFAR = ["--dataset", "cifar10", "--data-dir", "../shared/data/cifar-10"]
CIFAR_VICTIM = [*CIFAR, "--model", "resnet-s", "--augment", "--channels-last"]


@dataclass(frozen=True)
class Setup:
    eps: str
    model: list[str]  # `advguard train` options naming the data and the architecture
    data: list[str]  # the evaluation commands' data options
    pgd: list[str]  # `advguard evaluate` options of the PGD curve
    autoattack_images: int
    hold_out: int = 5000  # validation images held out of training (protocol "validation")
    test_images: int = 10_000  # the final AutoAttack of record


PROTOCOLS = ("validation", "test-1000")
FINAL_SLICE = 1000  # test images per slice of the final AutoAttack (each saved on its own)


MNIST_SETUP = Setup("0.3", ["--model", "small-cnn"], [],
                    ["--pgd-steps", "40", "--pgd-restarts", "5", "--test-limit", "1000"], 1000)
CIFAR_SETUP = Setup("8/255", CIFAR_VICTIM, CIFAR[2:],
                    ["--pgd-steps", "20", "--test-limit", "1000", "--grid",
                     "0,2/255,4/255,6/255,8/255"], 500)

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
    "pgd-3-0.3-10-ramp": ("pgd-3", "0.3", 10, ["--ramp", "0.3"]),  # single-strength control
    "pgd-3-narrow-10-ramp": ("pgd-3", "0.25,0.3,0.35", 10, ["--ramp", "0.3"]),
    "pgd-3-mixed-10-ramp-avg": ("pgd-3", "0.2,0.3,0.4", 10, ["--ramp", "0.3", "--average",
                                                            "0.999"]),
    # the small CNN with the TRADES and MART losses, one strength and several (the ramp)
    "trades-0.3-10": ("trades", "0.3", 10, []),
    "trades-mixed-10": ("trades", "0.2,0.3,0.4", 10, []),
    "mart-0.3-10": ("mart", "0.3", 10, []),
    "mart-mixed-10": ("mart", "0.2,0.3,0.4", 10, []),
    # the same two TRADES candidates at the budget: 34 epochs × 12 passes = 408 ≤ 410
    "trades-0.3-34": ("trades", "0.3", 34, []),
    "trades-mixed-34": ("trades", "0.2,0.3,0.4", 34, []),
    # TRADES' SmallCNN: TRADES with one strength, multi-strength TRADES, PGD-AT, all ≤ 410 passes
    "trades-cnn-pgd-at": ("pgd-at", "0.3", 10, ["--model", "trades-cnn"]),
    "trades-cnn-trades-0.3": ("trades", "0.3", 30, ["--model", "trades-cnn"]),
    "trades-cnn-trades-mixed": ("trades", "0.2,0.3,0.4", 30, ["--model", "trades-cnn"]),
    "trades-cnn-pgd-3-mixed": ("pgd-3", "0.2,0.3,0.4", 30, ["--ramp", "0.3", "--model",
                                                           "trades-cnn"]),
    # CIFAR-10 (names start with "cifar10-")
    "cifar10-clean": ("fgsm", "", 15, ["--schedule", "one-cycle", "--lr", "3e-3",
                                       "--label-smoothing", "0.1"]),
    "cifar10-fgsm-rs-mixed-ramp": ("fgsm-rs", "6/255,8/255,10/255", 12, ["--ramp", "0.3"]),
}


def _setup(name: str) -> Setup:
    return CIFAR_SETUP if name.startswith("cifar10-") else MNIST_SETUP


def _slice_path(d: Path, start: int) -> Path:
    """One saved slice of the final AutoAttack: test images ``start`` .. ``start + FINAL_SLICE``."""
    return d / f"autoattack-test-{start:05d}.json"


def _run(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, "-m", "advguard.cli", *args], check=True, stdout=f,
                       stderr=subprocess.STDOUT, env=env)


def study(out: Path, name: str, protocol: str = "validation") -> dict:
    recipe, strengths, epochs, extra = CANDIDATES[name]
    setup = _setup(name)
    val = protocol == "validation"
    hold = ["--hold-out", str(setup.hold_out)] if val else []
    split = ["--split", "val"] if val else []
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    model, log = d / "model.safetensors", d / "log.txt"
    if not model.exists():
        _run(["train", str(model), *setup.model, "--recipe", recipe,
              *(["--strengths", strengths] if strengths else []), "--epochs", str(epochs),
              "--seed", "0", "-q", *hold, *extra], log)
    if not (d / "pgd.json").exists():
        _run(["evaluate", str(model), "--attack", "white-box-pgd", *setup.pgd, *setup.data,
              *split, "--out", str(d / "pgd.json"), "-q"], log)
    if not (d / "autoattack.json").exists():
        _run(["audit", str(model), "--eps", setup.eps, "--only-autoattack", "--test-limit",
              str(setup.autoattack_images), *setup.data, *split,
              "--out", str(d / "autoattack.json"), "-q"], log)
    meta = read_metadata(model)
    pgd = json.loads((d / "pgd.json").read_text())
    aa = json.loads((d / "autoattack.json").read_text())["autoattack"]
    eps = tuple(strength(e) for e in strengths.split(",")) if strengths else ()
    row = {"recipe": recipe, "strengths": list(eps), "epochs": epochs, "options": extra,
           "train_command": " ".join(["advguard", "train", "OUT", *setup.model, "--recipe",
                                      recipe, *(["--strengths", strengths] if strengths
                                                else []), "--epochs", str(epochs), *extra]),
           "clean_accuracy_10k": meta["test_accuracy"], "train_seconds": meta["train_seconds"],
           "passes_per_example": get_recipe(recipe).passes(eps, epochs),
           "checks_per_example": get_recipe(recipe).checks(eps, epochs),
           "pgd_options": setup.pgd,
           "pgd_curve": dict(zip(map(str, pgd["grid"]), pgd["curve"], strict=True)),
           "pgd_min": min(pgd["curve"]), "autoattack": aa,
           "chosen_on": (f"validation: the first {setup.autoattack_images:,} of "
                         f"{setup.hold_out:,} training images held out" if val else
                         f"test: the first {setup.autoattack_images:,} test images (no "
                         "validation split; not a result of record)")}
    # a row rewritten after --final keeps the number of record its saved slices give
    if val and (final_aa := saved_final(d, setup)) is not None:
        row["autoattack_test_10k"] = final_aa
    return row


def final(out: Path, name: str, jobs: int = 1) -> dict:
    """AutoAttack (standard) once on the whole test set, for a candidate chosen on validation:
    the number of record, with its standard error. It runs as slices of ``FINAL_SLICE`` images
    (``audit --test-start``), ``jobs`` at a time, each saved as it finishes, so that hours of
    attack resume where they stopped; AutoAttack attacks every image on its own, so the slices
    add up to one run over the whole set (only the random draws of each slice differ)."""
    setup = _setup(name)
    d = out / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else None

    def run_slice(start: int) -> None:
        path = _slice_path(d, start)
        if not path.exists():
            _run(["audit", str(d / "model.safetensors"), "--eps", setup.eps, "--only-autoattack",
                  "--test-start", str(start), "--test-limit", str(FINAL_SLICE), *setup.data,
                  "--out", str(path), "-q"], d / f"log-test-{start:05d}.txt", env)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run_slice, range(0, setup.test_images, FINAL_SLICE)))
    merged = saved_final(d, setup)
    assert merged is not None  # every slice was written above, or _run raised
    return merged


def saved_final(d: Path, setup: Setup) -> dict | None:
    """The final AutoAttack merged from the slices saved in ``d``, or None while any is
    missing."""
    paths = [_slice_path(d, start) for start in range(0, setup.test_images, FINAL_SLICE)]
    if not all(p.exists() for p in paths):
        return None
    parts = [json.loads(p.read_text())["autoattack"] for p in paths]
    return {**merge_results(parts), "slices": len(parts)}


def table(summary: dict) -> str:
    """The recipes as one markdown table (accuracies in %, AutoAttack per attack)."""
    rows = ["| candidate | train command options | passes (+ checks) / example | train (s) "
            "| clean (10k) "
            "| PGD min over the grid | AA after APGD-CE | APGD-T | FAB-T | **AutoAttack** "
            "| Square alone |", "|---" * 11 + "|"]
    for name, s in summary.items():
        aa = s["autoattack"]
        after = [f"{100 * aa['robust_after'][k]:.1f}" for k in ("APGD-CE", "APGD-T", "FAB-T")]
        rows.append(f"| {name} | `{s['train_command'].split(' OUT ', 1)[1]}` | "
                    f"{s['passes_per_example']} (+{s.get('checks_per_example', '?')}) | "
                    f"{s['train_seconds']:.0f} | "
                    f"{100 * s['clean_accuracy_10k']:.2f} | {100 * s['pgd_min']:.1f} | "
                    + " | ".join(after) + f" | **{100 * aa['robust_accuracy']:.1f}** | "
                    f"{100 * aa['square_alone_accuracy']:.1f} |")
    return "\n".join(rows)


def _save_row(path: Path, name: str, row: dict) -> None:
    """Add one candidate's row to the summary as it is on disk now: studies of other candidates
    may run beside this one and write their rows while this one trains."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**summary, name: row})


def main(out: Path, names: list[str]) -> None:
    if names == ["--table"]:
        print(table(json.loads((out / "summary.json").read_text())))
        return
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if names[:1] == ["--final"]:
        jobs = 1
        if names[1:2] == ["--jobs"]:
            jobs, names = int(names[2]), names[:1] + names[3:]
        for name in names[1:]:
            if not summary.get(name, {}).get("chosen_on", "").startswith("validation"):
                raise SystemExit(f"{name}: the final test-set number is for candidates chosen "
                                 "on validation (--protocol validation first)")
            aa = final(out, name, jobs)
            print(f"{name:<28} AutoAttack on {aa['images']} test images "
                  f"{100 * aa['robust_accuracy']:.2f} ± {100 * aa['standard_error']:.2f}")
            _save_row(summary_path, name, {**summary[name], "autoattack_test_10k": aa})
        return
    protocol = "validation"
    if names[:1] == ["--protocol"]:
        protocol, names = names[1], names[2:]
        if protocol not in PROTOCOLS:
            raise SystemExit(f"--protocol must be one of {', '.join(PROTOCOLS)}")
    for name in names or [n for n in CANDIDATES if not n.startswith("cifar10-")]:
        s = study(out, name, protocol)
        print(f"{name:<28} clean {100 * s['clean_accuracy_10k']:.2f}  PGD min "
              f"{100 * s['pgd_min']:.1f}  AA {100 * s['autoattack']['robust_accuracy']:.1f}"
              f"  passes {s['passes_per_example']}  train {s['train_seconds']:.0f} s",
              flush=True)
        _save_row(summary_path, name, s)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
