"""``ftlab eval``: score a model on one or more suites.

Example::

    ftlab eval --model smollm2-135m-instruct --suite world-facts --suite /path/ARC-Easy-Dev.jsonl --limit 200 --json

With ``--json`` the last line of stdout is one JSON object ``{"model", "suites": {name: {"metric", "score", "n",
"stderr"}}}``; progress bars and notes go to stderr. ``--model`` also takes a PEFT adapter folder. ``--dtype bf16``
(or ``auto``, the checkpoint's own) scores the model in that dtype; ``--quantization``, ``--device-map``, ``--attn``,
``--revision`` and ``--trust-remote-code`` load it as ``ftlab.loading.ModelSettings`` says. A suite
``lm-eval:TASK`` is an lm-evaluation-harness task, group or tag scored through lm-eval (``pip install
'ftlab[harness]'``); ``--lm-eval-include DIR`` adds a folder of custom task YAMLs. ``--conjugate plain``
(repeatable: ``fewshot``, ``translate``) also scores each generative suite asked in that form, reported as
``<suite>@<form>`` (``ftlab.evals.conjugate``).
"""

from __future__ import annotations

import json

import typer

from ftlab.cli.common import (
    ATTN,
    DEVICE_MAP,
    DTYPE,
    EMBEDDED,
    QUANTIZATION,
    REVISION,
    TRUST_REMOTE_CODE,
    command,
    console,
    fail,
    load_settings,
)


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
    conjugate: list[str] = typer.Option(
        [], "--conjugate", help="Also ask each generative suite in this form (plain, fewshot, translate); repeatable."
    ),
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Score a model on evaluation suites."""
    from ftlab.evals.runner import evaluate_many
    from ftlab.evals.suites import load_suite
    from ftlab.models import load_model

    settings = load_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    include = lm_eval_include or None
    suites = [load_suite(ref, scorer=scorer, limit=limit, split=split, lm_eval_include=include) for ref in suite]
    if conjugate:  # each suite asked again farther from a chat fine-tune's prompts (ftlab.evals.conjugate)
        from ftlab.evals.conjugate import check_forms, conjugate_suite

        check_forms(conjugate, "--conjugate")
        for s, form in [(s, form) for s in list(suites) for form in conjugate]:
            rewritten = conjugate_suite(s, form)
            if rewritten is None:
                console(stderr=True).print(f"note: the {form} form does not apply to suite {s.name}; skipped")
            else:
                suites.append(rewritten)
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        fail(f"two suites share a name: {names}")
    lm, tok = load_model(model, base=base, settings=settings)
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
