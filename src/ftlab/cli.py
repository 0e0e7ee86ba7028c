"""The ``ftlab`` command line: each command is a thin shell over the library API."""

from __future__ import annotations

from pathlib import Path

import typer

from ftlab import __version__

app = typer.Typer(help="ftlab: fine-tune language models and measure what they forget.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ftlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ftlab: fine-tune language models and measure what they forget."""


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config (see examples/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
) -> None:
    """Fine-tune a model with one method, as a YAML config says; writes the model under output.dir."""
    from ftlab.config import RunConfig, load_config
    from ftlab.train.run import run_train

    with _clear_errors():
        cfg = load_config(RunConfig, config, set_)
        out, result = run_train(cfg)
    typer.echo(f"trained {result.steps} steps in {result.train_seconds:.1f}s; {result.trainable_params:,} trainable")
    typer.echo(f"saved to {out}")


@app.command("run")
def run_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML (see examples/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.max_steps=20 (repeatable)."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default: the config's `out`)."),
    store: Path | None = typer.Option(None, "--store", help="SQLite store (default: $FTLAB_STORE or ~/.local/share)."),
) -> None:
    """Fine-tune one base with several methods (arms) over one or more stages; evaluate, store, summarise."""
    from ftlab.experiment import load_experiment
    from ftlab.runner import print_table, run_experiment
    from ftlab.store import Store

    with _clear_errors():
        cfg = load_experiment(experiment, set_ + ([f"out={out}"] if out else []))
        summary = run_experiment(cfg, Store(store))
    from ftlab.runner import process_state

    if process_state().is_main_process:  # under `accelerate launch` / `torchrun`, print once
        print_table(summary)
        typer.echo(f"summary: {Path(cfg.out) / 'summary.json'}")


@app.command()
def demo(
    out: str = typer.Option("out/demo", "--out", help="Output folder."),
    steps: int = typer.Option(18, "--steps", help="Optimizer steps per arm (batch 8)."),
    store: Path | None = typer.Option(None, "--store", help="SQLite store (default: $FTLAB_STORE or ~/.local/share)."),
) -> None:
    """The embedded SmolLM2-135M-Instruct learns invented capitals with every method; prints a table and a report."""
    from ftlab.demo import demo_config
    from ftlab.runner import print_table, run_experiment
    from ftlab.store import Store

    with _clear_errors():
        cfg = demo_config(out, steps)
        st = Store(store)
        summary = run_experiment(cfg, st)
    print_table(summary)
    from ftlab.report import render_report

    page = render_report(st, summary["run_id"], Path(out) / "report.html")
    typer.echo(f"report: {page}")
    typer.echo(f"summary: {Path(out) / 'summary.json'}")


class _clear_errors:
    """Turn ftlab's own input errors into a one-line message and exit code 2, instead of a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from ftlab.config import ConfigError
        from ftlab.data import DataError
        from ftlab.models import ModelNotFoundError

        if exc_type is not None and issubclass(
            exc_type, (ConfigError, DataError, ModelNotFoundError, FileNotFoundError)
        ):
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(2)
        return False


from ftlab.edits.cli import analyze_app, edit_app  # noqa: E402

app.add_typer(edit_app, name="edit")
app.add_typer(analyze_app, name="analyze")

from ftlab.evals.cli import eval_cmd  # noqa: E402

app.command("eval")(eval_cmd)

from ftlab.report.cli import compare_cmd, report_cmd, runs_cmd  # noqa: E402

app.command("report")(report_cmd)
app.command("runs")(runs_cmd)
app.command("compare")(compare_cmd)
