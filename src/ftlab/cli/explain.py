"""``ftlab explain RUN``: the worst-forgotten items of each trained arm, explained (``ftlab.analysis.explain``).

For each trained arm and retained suite, the items the arm lost most on: the base and tuned answers side by side, the
tuning contribution (TuCo) on the prompt (computed by ``ftlab run`` for ``eval.explain`` items per suite), and whether
the best repair point gets the item back. With ``--json`` the last line of stdout is one JSON object
``{"run_id", "explanations": {arm: {suite: [{"item_id", "prompt", "reference", "base_answer", "tuned_answer",
"tuco", "repaired", "repair_point", ...}]}}}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ftlab.cli.common import STORE_HELP, command, console
from ftlab.cli.report import RUN_HELP, resolve_run


def register(app: typer.Typer) -> None:
    command(app, "explain")(explain_cmd)


def explain_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    store_path: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    items: int | None = typer.Option(
        None, "--items", min=1, help="Items per arm and suite (default: the run's eval.explain, else 5)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
) -> None:
    """Explain the items each trained arm forgot: answers, TuCo and the best repair point."""
    from ftlab.analysis.explain import explanations
    from ftlab.report.digest import summary_dict
    from ftlab.report.summary import load_summary

    store, row = resolve_run(run, store_path)
    summary = load_summary(store, row["run_id"])
    digest = summary_dict(summary)
    recommended = digest.get("budget") or digest.get("recommended")  # each arm's budget point, where a search ran
    k = items if items is not None else max(1, int((summary.config.get("eval") or {}).get("explain", 5) or 5))
    explained = explanations(store, summary, recommended, k=k)
    if json_out:
        typer.echo(json.dumps({"run_id": summary.run_id, "explanations": explained}))
        return
    from rich.table import Table

    out = console()
    if not explained:
        out.print("no trained arm forgot a retained-suite item")
        return
    for arm, by_suite in explained.items():
        for suite, rows in by_suite.items():
            table = Table(
                "item", "prompt", "reference", "base answer", "tuned answer", "TuCo", "repair", title=f"{arm}: {suite}"
            )
            for r in rows:
                tuco = "-" if r["tuco"] is None else f"{r['tuco']:.3f}"
                fixed = "-" if r["repaired"] is None else ("back" if r["repaired"] else "still lost")
                cells = [
                    r["item_id"],
                    r["prompt"][:60],
                    r["reference"][:30],
                    r["base_answer"][:40],
                    r["tuned_answer"][:40],
                ]
                table.add_row(*cells, tuco, fixed)
            out.print(table)
