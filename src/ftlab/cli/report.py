"""``ftlab report``, ``ftlab runs`` and ``ftlab compare``: argument parsing and printing over ``ftlab.report``.

``ftlab report RUN`` writes the HTML page; ``--format csv|markdown|json`` prints the run's figures instead
(``ftlab.report.export``). ``ftlab compare RUN_A RUN_B [RUN_C ...]`` compares each run with the first.

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
    if not Path(path).exists():
        fail(f"no store at {path} (pass --store PATH or set $FTLAB_STORE)")
    store = Store(path)
    try:
        row = store.run(run_id)
    except KeyError as exc:
        fail(str(exc.args[0]))
    if row is None:
        fail(f"no run {run_id!r} in store {path}")
    return store, row


REPORT_FORMATS = ("html", "csv", "markdown", "json")


def report_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="File to write (html: default <run out_dir>/report.html; csv, markdown, json: default stdout).",
    ),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    items: int = typer.Option(3, "--items", min=0, help="Worst-forgotten items to show per retained suite and arm."),
    fmt: str = typer.Option(
        "html",
        "--format",
        "-f",
        help="html (the report page), or the run's figures as csv, markdown (one row per arm and suite) or json "
        "(the summary.json dict).",
    ),
) -> None:
    """Write a run's self-contained HTML report with its PNG plots beside it, or print its figures as CSV, a
    Markdown table or JSON."""
    if fmt not in REPORT_FORMATS:
        fail(f"unknown --format {fmt!r}; choose from {', '.join(REPORT_FORMATS)}")
    db, row = resolve_run(run, store)
    if fmt != "html":
        from ftlab.report.digest import build_summary
        from ftlab.report.export import export_summary

        text = export_summary(build_summary(db, row["run_id"]), fmt)
        if out is None:
            typer.echo(text, nl=False)
        else:
            from ftlab.atomic import write_text

            typer.echo(f"wrote {write_text(out, text)}")
        return
    from ftlab.report.html import render_report

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
    if not Path(path).exists():
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
    runs: list[str] = typer.Argument(
        ..., help="Two or more runs (id, prefix or output folder); each is compared with the first."
    ),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Compare runs arm by arm: target gain, retained ratios and final scores side by side, each run against the
    first (A).

    With ``--json``, two runs print ``{"a": {"run_id", "name"}, "b": {...}, "rows": [...]}``; three or more print
    ``{"a": {...}, "comparisons": [{"b": {...}, "rows": [...]}, ...]}``, one entry per later run, in order.
    """
    from rich.table import Table

    from ftlab.report.digest import compare_rows
    from ftlab.report.summary import load_summary

    if len(runs) < 2:
        fail("compare needs two or more runs")
    a, *others = (load_summary(*_store_and_id(run, store)) for run in runs)
    pairs = [(b, compare_rows(a, b)) for b in others]
    if as_json:
        comparisons = [{"b": _head(b), "rows": rows} for b, rows in pairs]
        body = comparisons[0] if len(comparisons) == 1 else {"comparisons": comparisons}
        typer.echo(json.dumps({"a": _head(a), **body}, indent=2))
        return
    out = console()
    for b, rows in pairs:
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
        out.print(table)
    out.print("* significant: a paired test over the items both runs scored (aggregate rows carry no test)")


def _head(summary: Any) -> dict[str, Any]:
    return {"run_id": summary.run_id, "name": summary.run.get("name")}


def _store_and_id(run: str, store: Path | None) -> tuple[Any, str]:
    db, row = resolve_run(run, store)
    return db, row["run_id"]
