"""What every command module shares: the one error handler, shared options, and console helpers.

Nothing here imports torch, sqlite3 or matplotlib: ``ftlab --help`` and every command's argument parsing stay fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from ftlab.errors import InputError

try:  # typer vendors click from 0.22 on
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

F = TypeVar("F", bound=Callable[..., Any])

# The embedded default model's name (ftlab.models.EMBEDDED_NAME; not imported here because that module loads torch).
EMBEDDED = "smollm2-135m-instruct"
STORE_HELP = "SQLite store (default: $FTLAB_STORE or ~/.local/share/ftlab/ftlab.db; for a run folder, its ftlab.db)."


def fail(message: str) -> NoReturn:
    """Print one red ``error:`` line on stderr and exit with code 2."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())  # always one line
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


class OneLineErrors(TyperGroup):
    """The root command group: a usage error (a bad option value such as ``--limit 0``, an unknown option, a missing
    argument) is one red ``error:`` line naming the option and exit code 2, like every other input error, instead of
    click's usage box. Asking for help (no arguments) still prints the help."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _usage_error(exc)


def _usage_error(exc: UsageError) -> NoReturn:
    if type(exc).__name__ == "NoArgsIsHelpError":
        raise exc
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    fail(" ".join(exc.format_message().split()) + where)


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


def load(ref: str, base: str | None = None, settings: Any = None) -> tuple[Any, Any]:
    """Model and tokenizer of a reference (an adapter folder goes on ``base``, else the base it records), loaded as
    ``settings`` (``ftlab.loading.ModelSettings``, from ``load_settings``) say."""
    import time

    from ftlab.models import load_model

    start = time.perf_counter()
    model, tok = load_model(ref, base=base, settings=settings)
    console(stderr=True).print(f"loaded {ref} in {time.perf_counter() - start:.1f}s")
    return model, tok


# How every model of a command is loaded (ftlab.loading.ModelSettings); pass the six values to ``load_settings``.
DTYPE = typer.Option(None, "--dtype", help="Weights dtype: auto (the checkpoint's own), bf16, fp16 or fp32 [fp32].")
DEVICE_MAP = typer.Option(
    None, "--device-map", help="auto (spread over GPUs, then CPU), cpu, cuda, cuda:N [CUDA when available, else CPU]."
)
ATTN = typer.Option(None, "--attn", help="Attention kernel: eager, sdpa, flash_attention_2, ... [transformers' pick].")
REVISION = typer.Option(None, "--revision", help="Branch, tag or commit of a hub model.")
TRUST_REMOTE_CODE = typer.Option(
    False, "--trust-remote-code", help="Run the model's own code from the hub (only for a model you trust)."
)
QUANTIZATION = typer.Option(None, "--quantization", help="none, 4bit (bitsandbytes NF4) or 8bit (LLM.int8).")


def load_settings(
    dtype: str | None, device_map: str | None, attn: str | None, revision: str | None, trust: bool, quant: str | None
) -> Any:
    """``ModelSettings`` from the load options above; a bad value is a ``ConfigError`` naming the option."""
    from ftlab.loading import settings_from_options

    return settings_from_options(dtype, device_map, attn, revision, trust, quant)


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
