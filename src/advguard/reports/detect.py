"""Detection results -> ``results.json``, ``table.md`` (the paper's Table 2 layout),
``roc.png``, ``threshold.png`` (Fig. 3) and ``density.png`` (Fig. 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advguard.evaluation import roc, threshold_sweep
from advguard.io import atomic_write, write_json, write_text

# The paper's Table 2 (OverFeat on ImageNet): EER accuracy (%) per pre-processing and score.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "none": {"knn": (70.7, 69.9, 70.3, 58.1), "wknn": (71.2, 70.8, 71.0, 59.6),
             "dwknn": (71.0, 69.9, 70.4, 58.6)},
    "l2": {"knn": (79.2, 74.3, 76.7, 60.7), "wknn": (81.4, 76.4, 78.9, 62.9),
           "dwknn": (81.7, 76.6, 79.1, 61.6)},
    "pca-whiten": {"knn": (86.4, 83.4, 84.9, 62.9), "wknn": (85.9, 83.8, 84.8, 65.0),
                   "dwknn": (86.5, 83.5, 85.0, 63.6)},
}
COLUMNS = ("lbfgs", "fgsm", "aggregated", "errors")
LABELS = {"lbfgs": "L-BFGS", "fgsm": "FGSM", "aggregated": "aggregated", "errors": "errors",
          "pgd": "PGD", "adaptive": "adaptive PGD"}


@dataclass(frozen=True)
class DetectResults:
    """The detection experiment's results (``results.json``)."""

    dataset: str
    model: str  # the attacked architecture
    k: int
    eps: float  # FGSM / PGD strength
    threat: str  # what the attacker knows
    test_accuracy: float  # of the attacked model, on the query images
    counts: dict[str, Any]  # per query set: attacked / fooled / failed (and L-BFGS's mean L2)
    bank_mb: dict[str, float]  # memory of the bank per pre-processing
    table: dict[str, dict[str, dict[str, Any]]]  # pre-processing -> weighting -> metrics
    lbfgs_vs_fgsm: dict[str, Any]
    mat: dict[str, Any] | None = None  # the detector on a mixed-MAT model
    # every detector side by side: name -> negative -> eer_accuracy, auroc, caught_at_keep
    detectors: dict[str, dict[str, dict[str, float]]] | None = None
    detector_details: dict[str, Any] | None = None  # layers, threshold, adaptive weight, ...
    model_sha256: str | None = None  # of the attacked model's file (the run's checkpoints/)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DetectResults:
        return cls(**obj)


def write_detect_report(out: str | Path, results: DetectResults,
                        best: dict[str, np.ndarray]) -> list[Path]:
    out = Path(out)
    return [write_json(out / "results.json", results.to_json()),
            write_text(out / "table.md", detect_table(results)),
            *plot_detection(out, best)]


def _cell(metrics: dict[str, Any], key: str) -> str:
    return f"{100 * metrics[key]['eer_accuracy']:.1f}" if key in metrics else "—"


def detect_table(result: DetectResults) -> str:
    results = result.to_json()
    t = results["table"]
    c = results["counts"]
    lines = [f"# {results['dataset']}: kNN detection, EER accuracy (%)", "",
             f"Attacked model: {results['model']} ({100 * results['test_accuracy']:.2f}% clean "
             "test accuracy" + (f"; sha256 {results['model_sha256'][:12]}…"
                                if results.get("model_sha256") else "")
             + f"); k = {results['k']}; FGSM/PGD ε = {results['eps']:.4g}. "
             "Positives: correctly classified test images; negatives: adversarial images that "
             "fool the model, or the model's errors. Ours / paper (OverFeat, ImageNet).", "",
             "| processing | score | " + " | ".join(LABELS[k] for k in COLUMNS)
             + " | PGD | adaptive PGD |", "|---|---|" + "---|" * (len(COLUMNS) + 2)]
    for pre in ("none", "l2", "pca-whiten"):
        for w in ("knn", "wknn", "dwknn"):
            m = t[pre][w]
            paper = PAPER_TABLE2[pre][w]
            cells = [f"{_cell(m, k)} / {p}" for k, p in zip(COLUMNS, paper, strict=True)]
            lines.append(f"| {pre} | {w} | " + " | ".join(cells)
                         + f" | {_cell(m, 'pgd')} | {_cell(m, 'adaptive')} |")
    best = t["pca-whiten"]["dwknn"]
    lines += ["", f"Negatives: L-BFGS {c['lbfgs']['fooled']} fooled of {c['lbfgs']['attacked']} "
              f"attacked ({c['lbfgs']['failed']} failures), FGSM {c['fgsm']['fooled']}, PGD "
              f"{c['pgd']['fooled']}, adaptive {c['adaptive']['fooled']}, errors {c['errors']}; "
              f"positives {c['authentic']}.", "",
              f"Operating point (PCA + whitening, DW-kNN; threshold keeps "
              f"{100 * best['kept_authentic']:.1f}% of authentic test inputs, set on the "
              "validation split): share of negatives filtered — "
              + ", ".join(f"{LABELS[k]} {100 * best[k]['filtered']:.1f}%"
                          for k in ("lbfgs", "fgsm", "pgd", "adaptive", "errors") if k in best)
              + "."]
    lv = results["lbfgs_vs_fgsm"]
    lines += ["", f"L-BFGS (targeted): success rate {100 * lv['lbfgs_success_rate']:.1f}%, mean "
              f"L2 {lv['lbfgs_mean_l2']:.3f}. At matched success rates (the share of the images "
              "each attack fools most cheaply):", "",
              "| success rate | L-BFGS mean L2 | FGSM ε | FGSM mean L2 |", "|---|---|---|---|"]
    lines += [f"| {100 * r['success_rate']:.0f}% | {r['lbfgs_mean_l2']:.3f} | {r['fgsm_eps']:.3f} "
              f"| {r['fgsm_mean_l2']:.3f} |" for r in lv["matched"]]
    if "mat" in results:
        m = results["mat"]
        mm = m["pca-whiten/dwknn"]
        lines += ["", f"On a mixed-MAT model (white-box FGSM training at "
                  f"{', '.join(f'{s:.4g}' for s in m['strengths'])}; "
                  f"{100 * m['test_accuracy']:.2f}% clean), PCA + whitening, DW-kNN: "
                  + ", ".join(f"{LABELS[k]} EER accuracy {100 * mm[k]['eer_accuracy']:.1f}% "
                              f"(n = {mm[k]['n']})" for k in ("fgsm", "pgd", "errors")
                              if k in mm) + "."]
    if "detectors" in results:
        lines += ["", *detectors_table(results)]
    lines += ["", "Memory of the bank (MB): " + ", ".join(
        f"{k} {v:.1f}" for k, v in results["bank_mb"].items()) + "."]
    return "\n".join(lines) + "\n"


NEGATIVES = ("lbfgs", "fgsm", "aggregated", "pgd", "adaptive", "errors")


def detectors_table(results: dict[str, Any]) -> list[str]:
    """Every detector side by side: EER accuracy / AUROC / caught at the operating point (%)."""
    first = results["detector_details"][next(iter(results["detectors"]))]
    lines = ["## Detectors side by side", "",
             f"Each cell: EER accuracy / AUROC / share caught at the threshold that keeps "
             f"{100 * first['keep']:.0f}% of the correctly classified calibration images "
             f"({100 * first['kept_authentic']:.1f}% of the authentic test images for "
             f"{next(iter(results['detectors']))}). Adaptive: each "
             "detector's own attack, its weight chosen on validation images.", "",
             "| detector | layers | " + " | ".join(LABELS[n] for n in NEGATIVES) + " |",
             "|---|---|" + "---|" * len(NEGATIVES)]
    for name, row in results["detectors"].items():
        info = results["detector_details"][name]
        cells = [(f"{100 * row[n]['eer_accuracy']:.1f} / {100 * row[n]['auroc']:.1f} / "
                  f"{100 * row[n]['caught_at_keep']:.1f}") if n in row else "—"
                 for n in NEGATIVES]
        lines.append(f"| {name} | {', '.join(info['layers'])} | " + " | ".join(cells) + " |")
    combined = {n: i.get("combined_on") or (i.get("fitted") or {}).get("combined_on")
                for n, i in results["detector_details"].items()}  # older files: at the top
    notes = [f"{n}: combination fitted on {on}" for n, on in combined.items() if on]
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def plot_detection(out: Path, scores: dict[str, np.ndarray]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = scores["authentic"]
    negs = {k: v for k, v in scores.items() if k not in ("authentic", "calibration") and len(v)}
    paths = []

    fig, ax = plt.subplots(figsize=(5, 4.2))
    for name, neg in negs.items():
        fpr, tpr, _ = roc(pos, neg)
        ax.plot(fpr, tpr, label=LABELS.get(name, name))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (negatives trusted)")
    ax.set_ylabel("true positive rate (authentic trusted)")
    ax.set_title("ROC, PCA + whitening, DW-kNN", fontsize=10)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 4.2))
    thresholds = np.linspace(0, 1, 101)
    tpr, _ = threshold_sweep(pos, next(iter(negs.values())), thresholds)
    ax.plot(thresholds, tpr, "k", lw=2, label="authentic kept (TPR)")
    for name, neg in negs.items():
        _, fpr = threshold_sweep(pos, neg, thresholds)
        ax.plot(thresholds, fpr, label=f"{LABELS.get(name, name)} kept (FPR)")
    ax.set_xlabel("threshold on the score")
    ax.set_ylabel("share kept")
    ax.set_title("Threshold sweep (paper Fig. 3)", fontsize=10)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "threshold.png"))

    fig, ax = plt.subplots(figsize=(5, 4.2))
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(pos, bins=bins, density=True, histtype="step", lw=2, color="k", label="authentic")
    for name, neg in negs.items():
        ax.hist(neg, bins=bins, density=True, histtype="step", label=LABELS.get(name, name))
    ax.set_xlabel("DW-kNN score of the predicted class")
    ax.set_ylabel("density")
    ax.set_title("Score densities (paper Fig. 4)", fontsize=10)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "density.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path
