from __future__ import annotations

import csv
import io
import json

from advguard.reports import MatResults, MethodResult, write_report


def _results() -> MatResults:
    grid = [0.0, 0.1, 0.2]
    methods = {}
    for i, m in enumerate(["original", "single", "mixed", "parallel"]):
        curves = {"transfer-fgsm": [0.99, 0.9 - 0.1 * i, 0.5 + 0.1 * i],
                  "white-box-fgsm": [0.99, 0.3, 0.1],
                  "white-box-pgd": [0.99, 0.2, 0.0]}
        means = {k: sum(v) / 3 for k, v in curves.items()}
        methods[m] = MethodResult(curves["transfer-fgsm"], means["transfer-fgsm"],
                                  [] if m == "original" else [0.1], curves, means, 10.0 * i)
    return MatResults("mnist", "transfer", "transfer-fgsm", grid, methods, {"seed": 0})


def test_report_files_and_schema(tmp_path):
    results = _results()
    paths = write_report(tmp_path, results)
    assert sorted(p.name for p in paths) == ["curves.csv", "curves.png", "results.json",
                                             "table.md"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["dataset"] == "mnist" and data["setting"] == "transfer"
    assert data["grid"] == [0.0, 0.1, 0.2]
    for name, method in results.methods.items():
        entry = data["methods"][name]
        assert entry["curve"] == method.curve and entry["mean"] == method.mean
        assert entry["curves"] == method.curves and entry["strengths"] == method.strengths
    assert MatResults.load(tmp_path / "results.json") == results
    rows = list(csv.DictReader(io.StringIO((tmp_path / "curves.csv").read_text())))
    assert len(rows) == 3 * 3 and rows[1]["attack"] == "transfer-fgsm"
    assert float(rows[1]["mixed"]) == 0.7
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_table_puts_the_papers_numbers_beside_ours(tmp_path):
    write_report(tmp_path, _results())
    table = (tmp_path / "table.md").read_text()
    assert "| paper (Table 1, transfer FGSM) | 82.13 | 96.50 | 95.76 | 97.36 |" in table
    assert "| advguard, white-box PGD (on the evaluated model) | 39.67 |" in table
    assert "transfer training setting" in table
