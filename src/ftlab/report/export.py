"""A run's figures as text for other tools: CSV, a Markdown table or JSON (``ftlab report RUN --format ...``).

Every export is read from the one summary builder's dict (``ftlab.report.digest.build_summary``); nothing here
computes a figure. JSON is that dict as it stands (what ``summary.json`` holds). CSV and Markdown are one tidy table:

- one row per (arm, suite): first the base model's scores (arm ``base``), then every arm in the summary's order
  (trained arms, each followed by its repair points), each with its suites in the summary's order (targets, then
  retained, then others);
- columns ``COLUMNS``: ``arm``, ``kind`` (``base``, ``train`` or ``edit``), ``parent`` (the arm a repair point
  edits), ``suite``, ``role`` (``target``, ``retained`` or ``other``), then the suite's figures against the base on
  the same items at the arm's last stage: ``score``, ``n``, ``stderr``, ``delta`` (oriented: positive is better),
  ``ci_low``, ``ci_high`` (its interval at the run's confidence), ``p_value``, ``significant``, ``floor``, ``ratio``
  (after/before, before/after for a lower-is-better suite; empty at the floor), ``too_few_items``; and last the
  arm's own figures, repeated on each of its rows: ``target_gain`` and ``retention``;
- a base row holds only ``arm``, ``kind``, ``suite``, ``role`` and ``score``: the base is what the others are
  measured against;
- an empty cell is a figure that does not exist (``None`` in the summary); flags are ``true``/``false``.

CSV keeps every number exactly (Python's shortest round-trip form), so a CSV reader gets back the summary's
floats; Markdown rounds floats to 4 significant digits for reading and escapes ``|`` in names. Per-stage scores,
the accuracy matrix and the tests against a repair point's parent are in the JSON only.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

COLUMNS = (
    "arm", "kind", "parent", "suite", "role", "score", "n", "stderr", "delta", "ci_low", "ci_high", "p_value",
    "significant", "floor", "ratio", "too_few_items", "target_gain", "retention",
)  # fmt: skip
FORMATS = ("csv", "markdown", "json")


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The tidy rows of a ``build_summary`` dict: one per (arm, suite), keys ``COLUMNS`` (see the module doc).

    Args:
        summary: a ``build_summary`` dict.

    Returns:
        Rows whose values are the summary's own (floats, ints, bools, strings or None).
    """
    arms = summary.get("arms", {})
    roles: dict[str, str] = {}
    for arm in arms.values():
        for suite, entry in arm.get("suites", {}).items():
            roles.setdefault(suite, entry.get("role"))
    noise = summary.get("base_noise", {})
    rows = [
        _row(arm="base", kind="base", suite=suite, role=roles.get(suite), score=score, **noise.get(suite, {}))
        for suite, score in summary.get("base", {}).items()
    ]
    for name, arm in arms.items():
        for suite, entry in arm.get("suites", {}).items():
            ci = entry.get("ci") or (None, None)
            figures = {k: entry.get(k) for k in _SUITE_FIELDS}
            arm_figures = {"target_gain": arm.get("target_gain"), "retention": arm.get("retention")}
            names = {"arm": name, "kind": arm.get("kind"), "parent": arm.get("parent"), "suite": suite}
            rows.append(_row(**names, role=entry.get("role"), ci_low=ci[0], ci_high=ci[1], **figures, **arm_figures))
    return rows


_SUITE_FIELDS = ("score", "n", "stderr", "delta", "p_value", "significant", "floor", "ratio", "too_few_items")


def _row(**values: Any) -> dict[str, Any]:
    return {c: values.get(c) for c in COLUMNS}


def to_csv(summary: dict[str, Any]) -> str:
    """The tidy rows as CSV text with a header line (``\\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in summary_rows(summary):
        writer.writerow([_cell(row[c], exact=True) for c in COLUMNS])
    return buf.getvalue()


def to_markdown(summary: dict[str, Any]) -> str:
    """A heading line naming the run and its confidence level, then the tidy rows as one Markdown table."""
    lines = [
        f"### run {summary.get('run_id')} ({summary.get('name') or 'unnamed'}), "
        f"intervals at {summary.get('confidence', 0.95):.0%} confidence",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in summary_rows(summary):
        cells = [_cell(row[c], exact=False).replace("|", "\\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(summary: dict[str, Any]) -> str:
    """The ``build_summary`` dict as indented JSON, as ``summary.json`` holds it."""
    return json.dumps(summary, indent=2, default=str) + "\n"


def export_summary(summary: dict[str, Any], fmt: str) -> str:
    """``summary`` as text in ``fmt`` (one of ``FORMATS``).

    Raises:
        ValueError: an unknown format.
    """
    writers = {"csv": to_csv, "markdown": to_markdown, "json": to_json}
    if fmt not in writers:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return writers[fmt](summary)


def _cell(value: Any, exact: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.4g}"
    return str(value)
