"""MAT results: a dataclass -> ``results.json`` -> ``curves.csv``, ``curves.png``, ``table.md``."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advguard.data import dataset_info
from advguard.ensemble import VotingRule
from advguard.evaluation import ThreatSetting
from advguard.io import atomic_write, read_json, write_json, write_text
from advguard.strengths import RANDOM_WALK
from advguard.training import MULTI_STRENGTH, PAPER_METHODS, Method

# The paper's Table 1 (average test accuracy over the strength grid, its transfer setting), %,
# in the order of PAPER_METHODS.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    name: dict(zip([m.value for m in PAPER_METHODS], row, strict=True)) for name, row in {
        "cifar10": (53.73, 65.86, 65.81, 75.35),
        "cifar100": (5.77, 45.27, 57.12, 61.94),
        "mnist": (82.13, 96.50, 95.76, 97.36),
        "svhn": (44.04, 90.21, 91.31, 91.84),
    }.items()}

ATTACK_LABELS = {
    ThreatSetting.TRANSFER_FGSM.value: "transfer FGSM (crafted on the crafting model)",
    ThreatSetting.WHITE_BOX_FGSM.value: "white-box FGSM (on the evaluated model)",
    ThreatSetting.WHITE_BOX_PGD.value: "white-box PGD (on the evaluated model)",
}


@dataclass
class MethodResult:
    """One training method: its curve under the run's primary attack and under every attack."""

    curve: list[float]  # accuracy (fraction) at each grid strength, primary attack
    mean: float  # grid mean of ``curve``
    strengths: list[float]  # training strengths (empty for original)
    curves: dict[str, list[float]] = field(default_factory=dict)  # attack -> curve
    means: dict[str, float] = field(default_factory=dict)  # attack -> grid mean
    train_seconds: float = 0.0
    autoattack: dict[str, Any] | None = None  # AutoAttackResult.to_json() at the target ε


@dataclass
class MatResults:
    dataset: str
    setting: str  # "transfer" or "white-box": how the adversarial training data was crafted
    attack: str  # the primary evaluation attack (key of ``curves``)
    grid: list[float]
    methods: dict[str, MethodResult]
    details: dict[str, Any] = field(default_factory=dict)  # models, crafter accuracy, config…

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MatResults:
        methods = {k: MethodResult(**v) for k, v in obj["methods"].items()}
        return cls(obj["dataset"], obj["setting"], obj["attack"], list(obj["grid"]), methods,
                   dict(obj.get("details", {})))

    @classmethod
    def load(cls, path: str | Path) -> MatResults:
        return cls.from_json(read_json(path))


def write_report(run_dir: str | Path, results: MatResults) -> list[Path]:
    """Write ``results.json``, ``curves.csv``, ``curves.png`` and ``table.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    return [write_json(run_dir / "results.json", results.to_json()),
            write_text(run_dir / "curves.csv", curves_csv(results)),
            plot_curves(results, run_dir / "curves.png"),
            write_text(run_dir / "table.md", table_markdown(results))]


def _methods(results: MatResults) -> list[str]:
    return [m.value for m in Method if m.value in results.methods]


def _attacks(results: MatResults) -> list[str]:
    first = next(iter(results.methods.values()))
    return [results.attack] + [a for a in first.curves if a != results.attack]


def curves_csv(results: MatResults) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    methods = _methods(results)
    writer.writerow(["attack", "strength", *methods])
    for attack in _attacks(results):
        for j, eps in enumerate(results.grid):
            writer.writerow([attack, f"{eps:.6g}",
                             *(f"{results.methods[m].curves[attack][j]:.4f}" for m in methods)])
    return buf.getvalue()


def plot_curves(results: MatResults, path: str | Path) -> Path:
    """The paper's Figure 4: accuracy vs. strength, one panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = _attacks(results)
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8), squeeze=False)
    scale = dataset_info(results.dataset).unit
    for ax, attack in zip(axes[0], attacks, strict=True):
        for m in _methods(results):
            r = results.methods[m]
            ax.plot([e * scale for e in results.grid], [100 * a for a in r.curves[attack]],
                    marker="o", ms=3, label=f"{m} ({100 * r.means[attack]:.1f})")
        ax.set_title(ATTACK_LABELS.get(attack, attack), fontsize=9)
        ax.set_xlabel("test strength ε" + (" (×1/255)" if scale != 1.0 else ""))
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{results.dataset}: {results.setting} training setting", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def table_markdown(results: MatResults) -> str:
    """The paper's Table 1 (grid-mean accuracy, %) with the paper's row beside ours."""
    methods = _methods(results)
    lines = [f"# {results.dataset}: grid-mean accuracy (%), {results.setting} training setting",
             "",
             f"Grid: {len(results.grid)} strengths from {results.grid[0]:g} to "
             f"{results.grid[-1]:g}. Training strengths: "
             + "; ".join(f"{m} {results.methods[m].strengths or '—'}" for m in methods) + ".",
             "",
             "| evaluation attack | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for attack in _attacks(results):
        cells = [f"{100 * results.methods[m].means[attack]:.2f}" for m in methods]
        lines.append(f"| advguard, {ATTACK_LABELS.get(attack, attack)} | " + " | ".join(cells)
                     + " |")
    for attack in _attacks(results):
        if results.grid[0] == 0.0 and attack == _attacks(results)[0]:
            lines.append("| clean accuracy | " + " | ".join(
                f"{100 * results.methods[m].curves[attack][0]:.2f}" for m in methods) + " |")
        top = f"{ATTACK_LABELS.get(attack, attack)} at ε = {results.grid[-1]:g}"
        lines.append(f"| {top} | " + " | ".join(
            f"{100 * results.methods[m].curves[attack][-1]:.2f}" for m in methods) + " |")
    aa = [results.methods[m].autoattack for m in methods]
    if any(aa):
        first = next(a for a in aa if a)
        lines.append(f"| AutoAttack (standard) at ε = {first['eps']:g}, first {first['images']} "
                     "test images | " + " | ".join(
                         f"{100 * a['robust_accuracy']:.2f}" if a else "—" for a in aa) + " |")
    paper = PAPER_TABLE1.get(results.dataset)
    if paper and results.setting == "transfer":
        lines.append("| paper (Table 1, transfer FGSM) | "
                     + " | ".join(f"{paper[m]:.2f}" if m in paper else "—" for m in methods)
                     + " |")
    lines += ["", "Training wall time (s): " + ", ".join(
        f"{m} {results.methods[m].train_seconds:.0f}" for m in methods) + "."]
    recipe = results.details.get("recipe")
    if recipe:
        lines += ["", f"Training recipe: `{recipe['name']}` — {recipe['summary']}; "
                  f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, "
                  f"{recipe['schedule']} learning rate (peak {recipe['lr']:g})"
                  + (", random crop and flip" if recipe.get("augment") else "")
                  + (f", label smoothing {recipe['label_smoothing']:g}"
                     if recipe.get("label_smoothing") else "") + "."]
    lines += _selection_lines(results.details.get("selection"))
    lines += _voting_lines(results.details.get("voting"), results.details.get("voting_rule"))
    return "\n".join(lines) + "\n"


def _fmt(values: list[float]) -> str:
    return "{" + ", ".join(f"{v:.4g}" for v in values) + "}"


def _selection_lines(sel: dict[str, Any] | None) -> list[str]:
    """Why these strengths: MSSIM bound, accuracy matrix, walk vs. exact optimum."""
    if not sel or sel.get("source") != RANDOM_WALK:
        return [] if not sel else ["", f"Strengths: {sel.get('source')}."]
    ms = sel["mssim"]
    lines = ["", "## Strength selection (validation data only)", "",
             f"MSSIM between validation images and their FGSM copies (τ = {ms['tau']}): "
             + ", ".join(f"ε={e:.4g}: {v:.3f}" for e, v in zip(ms["grid"], ms["mssim"],
                                                               strict=True))
             + f". Bound: ε ≤ {ms['bound']:.4g}.", "",
             "Accuracy matrix A (%; row: model trained at ε_i, column: validation strength "
             f"ε_j; attack: {sel.get('matrix_attack', 'the setting’s FGSM, validation split')}):",
             "",
             "| train \\ test | " + " | ".join(f"{e:.4g}" for e in sel["candidates"]) + " |",
             "|---" * (len(sel["candidates"]) + 1) + "|"]
    for e, row in zip(sel["candidates"], sel["matrix"], strict=True):
        lines.append(f"| {e:.4g} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |")
    lines += ["", f"Random walk: {sel['walks']} walks of {sel['steps']} steps, penalty "
              f"a = {sel['penalty']}, seed {sel['seed']}.", "",
              "| method | walk's choice | G | exact optimum | G | agree | walk finds the "
              "optimum (100 seeds) |", "|---|---|---|---|---|---|---|"]
    for combo in sorted(MULTI_STRENGTH, key=lambda m: m is not Method.PARALLEL):
        s = sel[f"{combo.value}_selection"]
        lines.append(f"| {combo.value} MAT | {_fmt(s['walk']['strengths'])} | "
                     f"{s['walk']['G']:.4f} | "
                     f"{_fmt(s['exact']['strengths'])} | {s['exact']['G']:.4f} | "
                     f"{'yes' if s['agree'] else 'no'} | "
                     f"{100 * s['agreement_over_100_seeds']:.0f}% |")
    lines.append(f"| {Method.SINGLE.value} | best row: {_fmt(sel['single'])} | | | | | |")
    return lines


def _voting_lines(voting: dict[str, Any] | None, default: str | None) -> list[str]:
    if not voting:
        return []
    rules = [r.value for r in VotingRule if r.value in voting]
    attacks = list(voting[rules[0]]["means"])
    lines = ["", "## Parallel MAT voting rules (same members)", "",
             f"Grid-mean accuracy (%); PGD on the first {voting['pgd_test_images']} test images. "
             f"Default rule: {default}.", "",
             "| rule | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for r in rules:
        lines.append(f"| {r} | " + " | ".join(f"{100 * voting[r]['means'][a]:.2f}"
                                               for a in attacks) + " |")
    learned = voting.get(VotingRule.LEARNED.value, {})
    if "weights" in learned:
        lines += ["", "Learned weights a_k: " + _fmt(learned["weights"]) + "."]
    return lines
