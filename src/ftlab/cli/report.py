"""``ftlab report``, ``ftlab runs`` and ``ftlab compare``: argument parsing and printing over ``ftlab.report``.

A RUN argument is a run id (or a unique prefix of one) in the store, or a run's output folder holding
``summary.json``; for a folder, the store defaults to ``<folder>/ftlab.db`` when that file exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from ftlab.cli.common import STORE_HELP, command, console, fail

RUN_HELP = "Run id (or unique prefix), or a run output folder with summary.json."


def register(app: typer.Typer) -> None:
    command(app, "report")(report_cmd)
    command(app, "runs")(runs_cmd)
    command(app, "compare")(compare_cmd)


def resolve_run(run: str, store_path: Path | None) -> tuple[Any, dict[str, Any]]:
    """The store and runs row a RUN argument names; exits with code 2 and one line when either is not found."""
    from ftlab.store import Store, default_store_path

    run_id = run
    folder = Path(run)
    if folder.is_dir():
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            fail(f"{folder}: no summary.json in this folder (is it a run's output folder?)")
        try:
            run_id = json.loads(summary_file.read_text())["run_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            fail(f"{summary_file}: cannot read field 'run_id' ({exc})")
        if store_path is None and (folder / "ftlab.db").is_file():
            store_path = folder / "ftlab.db"
    path = store_path or default_store_path()
    if not Path(path).is_file():
        fail(f"no store at {path} (pass --store PATH or set $FTLAB_STORE)")
    store = Store(path)
    try:
        row = store.run(run_id)
    except KeyError as exc:
        fail(str(exc.args[0]))
    if row is None:
        fail(f"no run {run_id!r} in store {path}")
    return store, row


def report_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default: <run out_dir>/report.html)."
    ),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
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


def runs_cmd(store: Path | None = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """List the runs in the store, newest first."""
    from rich.table import Table

    from ftlab.store import Store, default_store_path

    path = store or default_store_path()
    if not Path(path).is_file():
        fail(f"no store at {path} (pass --store PATH or set $FTLAB_STORE)")
    db = Store(path)
    table = Table(title=f"runs in {path}")
    for col in ("id", "name", "status", "created", "arms"):
        table.add_column(col)
    for r in db.runs():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r["created"] else ""
        arms = ", ".join(a["arm"] for a in db.arms(r["run_id"]) if a["kind"] != "base")
        table.add_row(r["run_id"], r["name"] or "", r["status"] or "", created, arms)
    console().print(table)


def compare_cmd(
    run_a: str = typer.Argument(..., help="First run (id, prefix or output folder)."),
    run_b: str = typer.Argument(..., help="Second run (id, prefix or output folder)."),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Compare two runs arm by arm: target gain, retained ratios and final scores side by side."""
    from rich.table import Table

    from ftlab.report.summary import compare_rows, load_summary

    a, b = (load_summary(*_store_and_id(run, store)) for run in (run_a, run_b))
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
        if r["significant"]:
            cells[-1] += " *"
        table.add_row(r["arm"], r["metric"], *cells)
    out = console()
    out.print(table)
    out.print("* significant: a paired test over the items both runs scored (aggregate rows carry no test)")


def _store_and_id(run: str, store: Path | None) -> tuple[Any, str]:
    db, row = resolve_run(run, store)
    return db, row["run_id"]
