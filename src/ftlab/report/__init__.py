"""Run reports: one self-contained HTML page per run, PNG plots beside it, and the ``report``/``runs``/``compare``
commands.

- ``summary.py``: the run's store rows as plain tables (scores per stage, gain, retained ratios, Pareto front,
  accuracy matrix, worst-forgotten items);
- ``plots.py``: pure functions from those rows to matplotlib figures;
- ``html.py``: the page (``render_report``);
- ``cli.py``: the command functions registered in ``ftlab.cli``.

The names below are imported on first use: ``ftlab.cli`` imports ``ftlab.report.cli`` at start-up, and that must
not pull in matplotlib (or torch, through ``ftlab.evals``) for every command.
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
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftlab.report' has no attribute {name!r}")
