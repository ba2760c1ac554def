"""The HTML report of the committed MNIST runs: it renders, every figure is embedded, every
number in its tables is the one in the run's JSON files, and Chromium shows its tables and
figures."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_serve import _needs

from advguard.reports import write_html_report
from advguard.reports.html import lookup

RESULTS = Path(__file__).parents[1] / "docs" / "results"
RUNS = ["mnist-transfer", "mnist-white-box-walk", "mnist-white-box-cnn", "mnist-detect",
        "mnist-default", "cifar10-transfer-resnet",
        "cifar10-detect-resnet"]


class Page(HTMLParser):
    """Collects the images and the numbered cells of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[dict[str, str]] = []
        self.tables = 0
        self._cell: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "table":
            self.tables += 1
        elif tag == "td" and "data-key" in a:
            self._cell = {**a, "text": ""}

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None


@pytest.fixture(params=RUNS)
def report(request, tmp_path) -> tuple[Path, Page]:
    run = shutil.copytree(RESULTS / request.param, tmp_path / request.param)
    (run / "report.html").unlink(missing_ok=True)
    path = write_html_report(run)
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return run, page


def test_every_figure_is_embedded(report):
    run, page = report
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    expected = 1 if (run / "curves.png").exists() else 3
    if "matrix" in json.dumps(json.loads((run / "results.json").read_text())
                              .get("details", {}).get("selection", {})):
        expected += 1  # the accuracy matrix's heat map
    assert len(page.images) == expected


def test_every_number_is_the_one_in_the_results(report):
    run, page = report
    assert len(page.cells) > 20
    files: dict[str, object] = {}
    for cell in page.cells:
        source = cell["data-source"]
        obj = files.setdefault(source, json.loads((run / source).read_text()))
        value = lookup(obj, json.loads(cell["data-key"]))
        assert float(cell["data-value"]) == pytest.approx(value, rel=1e-12), cell
        shown = float(cell["text"])
        scaled = 100 * value if abs(shown - 100 * value) < abs(shown - value) else value
        digits = len(cell["text"].split(".")[1]) if "." in cell["text"] else 0
        assert shown == pytest.approx(scaled, abs=0.51 * 10 ** -digits), cell


def test_the_committed_report_is_current(report):
    run, page = report
    committed = RESULTS / run.name / "report.html"
    assert committed.is_file(), f"no report.html: advguard report docs/results/{run.name}"
    old = Page()
    old.feed(committed.read_text(encoding="utf-8"))
    assert old.cells == page.cells and old.tables == page.tables


def test_chromium_shows_the_tables_and_figures(report, tmp_path):
    chromium = _needs("chromium")
    from playwright.sync_api import sync_playwright

    run, page = report
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            tab = browser.new_page()
            tab.goto((run / "report.html").as_uri())
            assert tab.locator("table").count() == page.tables >= 3
            widths = tab.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == len(page.images) and all(w > 100 for w in widths)
            heading = tab.inner_text("h2")
            assert "Table 1" in heading or "Table 2" in heading
        finally:
            browser.close()


def test_the_autoattack_column_is_in_the_report(tmp_path):
    run = shutil.copytree(RESULTS / "mnist-default", tmp_path / "run")
    page = Page()
    page.feed(write_html_report(run).read_text(encoding="utf-8"))
    keys = [json.loads(c["data-key"]) for c in page.cells]
    results = json.loads((run / "results.json").read_text())
    for method in results["methods"]:
        assert ["methods", method, "autoattack", "robust_after", "Square"] in keys
        assert ["methods", method, "autoattack", "square_alone_accuracy"] in keys
