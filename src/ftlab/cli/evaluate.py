"""``ftlab eval``: score a model on one or more suites.

Example::

    ftlab eval --model smollm2-135m-instruct --suite world-facts --suite /path/ARC-Easy-Dev.jsonl --limit 200 --json

With ``--json`` the last line of stdout is one JSON object ``{"model", "suites": {name: {"metric", "score", "n",
"stderr"}}}``; progress bars and notes go to stderr. ``--model`` also takes a PEFT adapter folder. A suite
``lm-eval:TASK`` is an lm-evaluation-harness task, group or tag scored through lm-eval (``pip install
'ftlab[harness]'``); ``--lm-eval-include DIR`` adds a folder of custom task YAMLs.
"""

from __future__ import annotations

import json

import typer

from ftlab.cli.common import EMBEDDED, command, console, fail


def register(app: typer.Typer) -> None:
    command(app, "eval")(eval_cmd)


def eval_cmd(
    suite: list[str] = typer.Option(
        ...,
        "--suite",
        "-s",
        help="Built-in suite name, a file/folder path (format detected), or lm-eval:TASK; repeatable.",
    ),
    model: str = typer.Option(
        EMBEDDED, "--model", "-m", help="Hugging Face id, local folder, PEFT adapter folder, or smollm2-135m-instruct."
    ),
    base: str | None = typer.Option(None, "--base", help="Base of an adapter folder (default: its recorded base)."),
    scorer: str | None = typer.Option(
        None, "--scorer", help="Scorer for file suites: contains, exact, numeric (prompt/answer JSONL), choice_norm."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Score N items of each suite (a suite of several subjects gives each its share)."
    ),
    split: str = typer.Option("test", "--split", help="Split for fictional-capitals: train or test."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per batch."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Override the generation cap."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
    lm_eval_include: list[str] = typer.Option(
        [], "--lm-eval-include", help="Folder of custom lm-eval task YAMLs for lm-eval:TASK suites; repeatable."
    ),
) -> None:
    """Score a model on evaluation suites."""
    from ftlab.evals.runner import evaluate_many
    from ftlab.evals.suites import load_suite
    from ftlab.models import load_model

    include = lm_eval_include or None
    suites = [load_suite(ref, scorer=scorer, limit=limit, split=split, lm_eval_include=include) for ref in suite]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        fail(f"two suites share a name: {names}")
    lm, tok = load_model(model, base=base)
    results = evaluate_many(lm, tok, suites, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=True)
    if json_out:
        typer.echo(json.dumps({"model": model, "suites": {name: r.to_dict() for name, r in results.items()}}))
        return
    from rich.table import Table

    table = Table(title=f"ftlab eval: {model}")
    for col in ("suite", "metric", "score", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("suite", "metric") else "right")
    for name, r in results.items():
        table.add_row(name, r.metric, f"{r.score:.4f}", f"{r.stderr:.4f}", str(r.n))
    console().print(table)
