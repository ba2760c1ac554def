"""One self-contained ``report.html`` per run directory, rendered from its ``results.json`` and
``config.json`` (never typed by hand) with a Jinja2 template; every figure is embedded as a PNG
data URI, so the file can be mailed or archived alone.

Every number in a table carries ``data-source`` (the JSON file in the run directory),
``data-key`` (its path there, a JSON list) and ``data-value`` (the exact value), so a test can
check each printed number against the file it came from.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from advguard.errors import CheckpointError
from advguard.io import read_json, write_text
from advguard.reports.detect import LABELS, PAPER_TABLE2
from advguard.reports.mat import ATTACK_LABELS, PAPER_TABLE1
from advguard.training import Method

REPORT = "report.html"


@dataclass(frozen=True)
class Cell:
    """A number as the report prints it, with where it comes from."""

    text: str
    key: str | None = None  # JSON list of the path in ``source``
    value: Any = None
    source: str = "results.json"


def lookup(obj: Any, path: list[Any]) -> Any:
    for part in path:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def percent(obj: dict[str, Any], *path: Any, digits: int = 2,
            source: str = "results.json") -> Cell:
    """``obj[path]`` (a fraction) printed as a percentage; ``—`` if absent."""
    return number(obj, *path, fmt=lambda v: f"{100 * v:.{digits}f}", source=source)


def number(obj: dict[str, Any], *path: Any, fmt: Any = "{:.4g}".format,
           source: str = "results.json") -> Cell:
    try:
        value = lookup(obj, list(path))
    except (KeyError, IndexError, TypeError):
        return Cell("—")
    return Cell(fmt(value), json.dumps(list(path)), value, source)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png_uri(buf.getvalue())


def heat_map(matrix: list[list[float]], strengths: list[float], scale: float) -> str:
    """The accuracy matrix as a heat map (rows: training strength, columns: test strength)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow([[100 * a for a in row] for row in matrix], cmap="viridis")
    labels = [f"{scale * e:.3g}" for e in strengths]
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("test strength" + (" (×1/255)" if scale != 1 else ""))
    ax.set_ylabel("training strength")
    for i, row in enumerate(matrix):
        for j, a in enumerate(row):
            ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="validation accuracy (%)")
    return _figure(fig)


def _figures(run_dir: Path, names: list[str]) -> list[dict[str, str]]:
    return [{"name": n, "uri": png_uri((run_dir / n).read_bytes())} for n in names
            if (run_dir / n).is_file()]


def _mat_context(run_dir: Path, r: dict[str, Any]) -> dict[str, Any]:
    from advguard.data import dataset_info

    info = dataset_info(r["dataset"])
    methods = [m.value for m in Method if m.value in r["methods"]]
    first = r["methods"][methods[0]]
    attacks = [r["attack"]] + [a for a in first.get("curves", {}) if a != r["attack"]]
    curves = [{"attack": a, "label": ATTACK_LABELS.get(a, a),
               "rows": [{"method": m,
                         "cells": [percent(r, "methods", m, "curves", a, j)
                                   for j in range(len(r["grid"]))],
                         "mean": percent(r, "methods", m, "means", a)} for m in methods]}
              for a in attacks]
    paper = PAPER_TABLE1.get(info.name) if r["setting"] == "transfer" else None
    sel = r.get("details", {}).get("selection") or {}
    selection = None
    if sel.get("matrix"):
        path = ("details", "selection")
        selection = {
            "heat_map": heat_map(sel["matrix"], sel["candidates"], info.unit),
            "matrix_attack": sel.get("matrix_attack", "the setting's FGSM"),
            "walks": sel.get("walks"), "steps": sel.get("steps"), "penalty": sel.get("penalty"),
            "mssim": None if not sel.get("mssim") else {
                "tau": sel["mssim"]["tau"],
                "bound": number(r, *path, "mssim", "bound", fmt=lambda v: f"{info.unit * v:.3g}"),
                "rows": [(f"{info.unit * e:.3g}",
                          number(r, *path, "mssim", "mssim", j, fmt="{:.4f}".format))
                         for j, e in enumerate(sel["mssim"]["grid"])]},
            "methods": [{"method": m,
                         "walk": ", ".join(f"{info.unit * e:.3g}"
                                           for e in sel[f"{m}_selection"]["walk"]["strengths"]),
                         "exact": ", ".join(f"{info.unit * e:.3g}" for e in
                                            sel[f"{m}_selection"]["exact"]["strengths"]),
                         "walk_G": number(r, *path, f"{m}_selection", "walk", "G",
                                          fmt="{:.5f}".format),
                         "exact_G": number(r, *path, f"{m}_selection", "exact", "G",
                                           fmt="{:.5f}".format),
                         "agree": sel[f"{m}_selection"]["agree"],
                         "rate": percent(r, *path, f"{m}_selection", "agreement_over_100_seeds",
                                         digits=0)}
                        for m in ("parallel", "mixed") if f"{m}_selection" in sel]}
    audits = []
    for file in sorted((run_dir / "audit").glob("*.json")):
        a = read_json(file)
        src = f"audit/{file.name}"
        audits.append({"name": file.stem, "eps": a.get("eps"), "images": a.get("images"),
                       "rows": [(name, percent(a, "attacks", name, source=src))
                                for name in a.get("attacks", {})],
                       "clean": percent(a, "clean_accuracy", source=src),
                       "worst": percent(a, "worst_case_accuracy", source=src),
                       "warnings": a.get("warnings", [])})
    aa = {m: r["methods"][m]["autoattack"] for m in methods if r["methods"][m].get("autoattack")}
    first = next(iter(aa.values()), None)
    autoattack = None if first is None else {
        "eps": f"{info.unit * first['eps']:.3g}", "images": first["images"],
        "attacks": list(first["robust_after"]),
        "rows": [{"method": m, "clean": percent(r, "methods", m, "autoattack", "clean_accuracy"),
                  "after": [percent(r, "methods", m, "autoattack", "robust_after", a)
                            for a in a_m["robust_after"]],
                  "square": percent(r, "methods", m, "autoattack", "square_alone_accuracy"),
                  "warnings": a_m.get("warnings", [])}
                 for m, a_m in aa.items()]}
    return {"kind": "mat", "methods": methods, "autoattack": autoattack,
            "grid": [f"{info.unit * e:.3g}" for e in r["grid"]], "unit": info.unit,
            "curves": curves, "paper": paper,
            "table1": [(m, percent(r, "methods", m, "mean"),
                        None if paper is None else paper.get(m)) for m in methods],
            "strengths": {m: ", ".join(f"{info.unit * e:.3g}" for e in
                                       r["methods"][m]["strengths"]) for m in methods},
            "selection": selection, "audits": audits,
            "figures": _figures(run_dir, ["curves.png"])}


DETECT_COLUMNS = ("lbfgs", "fgsm", "aggregated", "errors", "pgd", "adaptive")


def _detect_context(run_dir: Path, r: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for pre in ("none", "l2", "pca-whiten"):
        for w in ("knn", "wknn", "dwknn"):
            rows.append({"pre": pre, "w": w,
                         "cells": [percent(r, "table", pre, w, c, "eer_accuracy", digits=1)
                                   for c in DETECT_COLUMNS],
                         "paper": [*PAPER_TABLE2[pre][w], None, None]})
    best = ("table", "pca-whiten", "dwknn")
    mat = r.get("mat")
    return {"kind": "detect", "columns": [LABELS[c] for c in DETECT_COLUMNS], "rows": rows,
            "filtered": [(LABELS[c], percent(r, *best, c, "filtered", digits=1))
                         for c in DETECT_COLUMNS if c in lookup(r, list(best))],
            "kept": percent(r, *best, "kept_authentic", digits=1),
            "accuracy": percent(r, "test_accuracy"), "mat": mat,
            "mat_cells": [] if not mat else [
                (LABELS[c], percent(r, "mat", "pca-whiten/dwknn", c, "eer_accuracy", digits=1))
                for c in ("fgsm", "pgd", "errors")],
            "mat_accuracy": percent(r, "mat", "test_accuracy"),
            "figures": _figures(run_dir, ["roc.png", "threshold.png", "density.png"])}


def write_html_report(run_dir: str | Path) -> Path:
    """Render ``run_dir/report.html`` from the run's ``results.json`` and ``config.json``."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise CheckpointError(f"{run_dir} holds no results.json (is it a finished run "
                              "directory?)")
    results = read_json(run_dir / "results.json")
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    if "methods" in results:
        context = _mat_context(run_dir, results)
        title = f"MAT on {results['dataset']} — {results['setting']} setting"
    elif "table" in results:
        context = _detect_context(run_dir, results)
        title = f"kNN detection on {results['dataset']}"
    else:
        raise CheckpointError(f"{run_dir / 'results.json'} is neither a MAT nor a detection "
                              "result")
    env = Environment(loader=PackageLoader("advguard.reports"),
                      autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title, run_dir=run_dir.name, results=results, config=config, **context)
    return write_text(run_dir / REPORT, html)
