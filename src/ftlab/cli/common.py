"""What every command module shares: the one error handler, shared options, and console helpers.

Nothing here imports torch, sqlite3 or matplotlib: ``ftlab --help`` and every command's argument parsing stay fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

from ftlab.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

# The embedded default model's name (ftlab.models.EMBEDDED_NAME; not imported here because that module loads torch).
EMBEDDED = "smollm2-135m-instruct"
STORE_HELP = "SQLite store (default: $FTLAB_STORE or ~/.local/share/ftlab/ftlab.db; for a run folder, its ftlab.db)."


def fail(message: str) -> NoReturn:
    """Print one red ``error:`` line on stderr and exit with code 2."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def clean_errors(fn: F) -> F:
    """The one error handler: ftlab's input errors (bad config, data, suite, model reference, settings) and missing
    files become one red line and exit code 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, FileNotFoundError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def command(app: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register ``fn`` on ``app`` behind ``clean_errors`` (``@command(app)`` instead of ``@app.command()``)."""

    def register(fn: F) -> F:
        app.command(name, **kwargs)(clean_errors(fn))
        return fn

    return register


def console(stderr: bool = False) -> Any:
    """A rich console; piped output (and CliRunner) gets a wide fixed width so ids stay on one line."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def load(ref: str, base: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer of a reference (an adapter folder goes on ``base``, else the base it records)."""
    import time

    from ftlab.models import load_model

    start = time.perf_counter()
    model, tok = load_model(ref, base=base)
    console(stderr=True).print(f"loaded {ref} in {time.perf_counter() - start:.1f}s")
    return model, tok


BASE = typer.Option(..., "--base", help="Base model: HF id, local folder or smollm2-135m-instruct.")
TUNED = typer.Option(..., "--tuned", help="Fine-tuned model: HF id, local folder or PEFT adapter folder.")
JSON = typer.Option(False, "--json", help="Print one JSON object (last stdout line) instead of a table.")


def prompts_from(prompt: list[str], suite: str | None, limit: int | None) -> tuple[list[str], list[str]]:
    """``(prompts, ids)`` from ``--prompt`` values or a suite's items."""
    if suite:
        from ftlab.evals import load_suite

        items = load_suite(suite, limit=limit).items
        return [it["prompt"] for it in items], [str(it["id"]) for it in items]
    if not prompt:
        fail("give --prompt (repeatable) or --suite")
    prompts = prompt[:limit] if limit else prompt
    return prompts, [str(i) for i in range(len(prompts))]


def generate_and_print(model: Any, tok: Any, prompts: list[str], ids: list[str], max_new: int, as_json: bool) -> None:
    """Greedy generations for each prompt, as a table or one JSON object ``{"outputs": [{"id", "prompt",
    "output"}]}``."""
    import json

    from rich.table import Table

    from ftlab.evals.generation import generate

    outs = generate(model, tok, prompts, batch_size=4, max_new_tokens=max_new)
    rows = [{"id": i, "prompt": p, "output": o} for i, p, o in zip(ids, prompts, outs, strict=True)]
    if as_json:
        typer.echo(json.dumps({"outputs": rows}))
        return
    table = Table("id", "prompt", "output")
    for r in rows:
        table.add_row(r["id"], r["prompt"][:60], r["output"])
    console().print(table)
