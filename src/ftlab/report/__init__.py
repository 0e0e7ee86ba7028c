"""Run reports: the one summary builder, one self-contained HTML page per run and PNG plots beside it.

- ``summary.py``: the run's store rows as plain tables (scores per stage, gain, retained ratios, Pareto front,
  accuracy matrix, worst-forgotten items);
- ``digest.py``: the plain summary dict (``summary.json``, the printed table), repair lines, run comparison;
- ``plots.py``: pure functions from those rows to matplotlib figures;
- ``html.py``: the page (``render_report``);
- ``export.py``: the summary as CSV, a Markdown table or JSON (``export_summary``, ``summary_rows``).

The commands that show them (``report``, ``runs``, ``compare``) live in ``ftlab.cli.report``.

The names below are imported on first use, so that importing the package does not pull in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Point": "ftlab.report.summary",
    "RunSummary": "ftlab.report.summary",
    "load_summary": "ftlab.report.summary",
    "pareto_front": "ftlab.report.summary",
    "render_report": "ftlab.report.html",
    "build_summary": "ftlab.report.digest",
    "compare_rows": "ftlab.report.digest",
    "repair_lines": "ftlab.report.digest",
    "export_summary": "ftlab.report.export",
    "summary_rows": "ftlab.report.export",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftlab.report' has no attribute {name!r}")
