"""The ``report``, ``runs`` and ``compare`` commands (registered on the app in ``ftlab.cli``).

A RUN argument is a run id (or a unique prefix of one) in the store, or a run's output folder holding
``summary.json``; for a folder, the store defaults to ``<folder>/ftlab.db`` when that file exists.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from ftlab.store import Store, default_store_path

_STORE_HELP = "SQLite store (default: $FTLAB_STORE or ~/.local/share/ftlab/ftlab.db; for a run folder, its ftlab.db)."


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def resolve_run(run: str, store_path: Path | None) -> tuple[Store, dict[str, Any]]:
    """The store and runs row a RUN argument names.

    Args:
        run: a run id or unique prefix, or a run output folder containing ``summary.json``.
        store_path: the ``--store`` option; None picks ``<folder>/ftlab.db`` for a folder that has one, else the
            default store.

    Returns:
        (store, the run's row). Exits with code 2 and a one-line message when the store or run is not found.
    """
    run_id = run
    folder = Path(run)
    if folder.is_dir():
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            _fail(f"{folder}: no summary.json in this folder (is it a run's output folder?)")
        try:
            run_id = json.loads(summary_file.read_text())["run_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            _fail(f"{summary_file}: cannot read field 'run_id' ({exc})")
        if store_path is None and (folder / "ftlab.db").is_file():
            store_path = folder / "ftlab.db"
    path = store_path or default_store_path()
    if not Path(path).is_file():
        _fail(f"no store at {path} (pass --store PATH or set $FTLAB_STORE)")
    store = Store(path)
    try:
        row = store.run(run_id)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    if row is None:
        _fail(f"no run {run_id!r} in store {path}")
    return store, row


def _console() -> Any:
    from rich.console import Console

    # Piped output (and CliRunner) has no terminal width; a wide fixed width keeps run ids on one line.
    return Console(width=None if sys.stdout.isatty() else 200)


def report_cmd(
    run: str = typer.Argument(..., help="Run id (or unique prefix), or a run output folder with summary.json."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default: <run out_dir>/report.html)."
    ),
    store: Path | None = typer.Option(None, "--store", help=_STORE_HELP),
    items: int = typer.Option(3, "--items", min=0, help="Worst-forgotten items to show per retained suite and arm."),
) -> None:
    """Write a run's self-contained HTML report, with its PNG plots beside it."""
    from ftlab.report.html import render_report

    db, row = resolve_run(run, store)
    if out is None:
        out = Path(row["out_dir"]) / "report.html" if row.get("out_dir") else Path(f"report-{row['run_id']}.html")
    path = render_report(db, row["run_id"], out, items_per_arm=items)
    typer.echo(f"wrote {path}")
    for png in sorted(path.parent.glob(f"{path.stem}_*.png")):
        typer.echo(f"  plot {png}")


def runs_cmd(store: Path | None = typer.Option(None, "--store", help=_STORE_HELP)) -> None:
    """List the runs in the store, newest first."""
    from rich.table import Table

    path = store or default_store_path()
    if not Path(path).is_file():
        _fail(f"no store at {path} (pass --store PATH or set $FTLAB_STORE)")
    db = Store(path)
    table = Table(title=f"runs in {path}")
    for col in ("id", "name", "status", "created", "arms"):
        table.add_column(col)
    for r in db.runs():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r["created"] else ""
        arms = ", ".join(a["arm"] for a in db.arms(r["run_id"]) if a["kind"] != "base")
        table.add_row(r["run_id"], r["name"] or "", r["status"] or "", created, arms)
    _console().print(table)


def compare_rows(a: Any, b: Any) -> list[dict[str, Any]]:
    """Side-by-side figures of two runs: one row per (arm, metric) with both values and b - a.

    Args:
        a: the first run's ``RunSummary``.
        b: the second run's ``RunSummary``.

    Returns:
        Rows ``{"arm", "metric", "a", "b", "delta"}``: target gain, mean and min retained ratio, then each suite's
        score at the arm's last stage; rows where neither run has a value are left out.
    """
    arms = list(dict.fromkeys([x["arm"] for x in a.arms] + [x["arm"] for x in b.arms]))
    suites = list(dict.fromkeys(a.suites + b.suites))
    rows = []
    for arm in arms:
        pa = {p.arm: p for p in a.points}.get(arm)
        pb = {p.arm: p for p in b.points}.get(arm)
        metrics: list[tuple[str, float | None, float | None]] = [
            ("target gain", pa and pa.gain, pb and pb.gain),
            ("retained (mean)", pa and pa.retained_mean, pb and pb.retained_mean),
            ("retained (min)", pa and pa.retained_min, pb and pb.retained_min),
        ]
        for s in suites:
            metrics.append((s, _final(a, arm, s), _final(b, arm, s)))
        for metric, va, vb in metrics:
            if va is None and vb is None:
                continue
            delta = vb - va if va is not None and vb is not None else None
            rows.append({"arm": arm, "metric": metric, "a": va, "b": vb, "delta": delta})
    return rows


def _final(summary: Any, arm: str, suite: str) -> float | None:
    stage = summary.final_stage.get(arm)
    return None if stage is None else summary.score(arm, stage, suite)


def compare_cmd(
    run_a: str = typer.Argument(..., help="First run (id, prefix or output folder)."),
    run_b: str = typer.Argument(..., help="Second run (id, prefix or output folder)."),
    store: Path | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Compare two runs arm by arm: target gain, retained ratios and final scores side by side."""
    from rich.table import Table

    from ftlab.report.summary import load_summary

    summaries = []
    for run in (run_a, run_b):
        db, row = resolve_run(run, store)
        summaries.append(load_summary(db, row["run_id"]))
    a, b = summaries
    rows = compare_rows(a, b)
    if as_json:
        head = {k: {"run_id": s.run_id, "name": s.run.get("name")} for k, s in (("a", a), ("b", b))}
        typer.echo(json.dumps({**head, "rows": rows}, indent=2))
        return
    table = Table(title=f"A = {a.run_id} ({a.run.get('name')})   B = {b.run_id} ({b.run.get('name')})")
    for col in ("arm", "metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col in ("arm", "metric") else "right")
    for r in rows:
        cells = [
            "-" if r[k] is None else f"{r[k]:+.3f}" if k == "delta" else f"{r[k]:.3f}" for k in ("a", "b", "delta")
        ]
        table.add_row(r["arm"], r["metric"], *cells)
    _console().print(table)
