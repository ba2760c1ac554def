"""Results as dataclasses, written as JSON, CSV, figures and Markdown tables."""

from advguard.reports.html import REPORT, write_html_report
from advguard.reports.mat import (
    PAPER_TABLE1,
    MatResults,
    MethodResult,
    curves_csv,
    plot_curves,
    table_markdown,
    write_report,
)

__all__ = ["PAPER_TABLE1", "REPORT", "MatResults", "MethodResult", "curves_csv", "plot_curves",
           "table_markdown", "write_html_report", "write_report"]
