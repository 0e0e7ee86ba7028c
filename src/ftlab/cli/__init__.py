"""The ``ftlab`` command line: the typer app and its command groups, one module each.

- ``train.py``: ``train``, ``run``, ``demo``;
- ``evaluate.py``: ``eval``;
- ``edit.py``: ``edit ...`` (repairs);
- ``analyze.py``: ``analyze ...`` (where a fine-tune lives);
- ``report.py``: ``report``, ``runs``, ``compare``;
- ``repair.py``: ``repair`` (the best repair that keeps a forgetting budget).

Command modules hold argument parsing and printing only; the work is in the library (``ftlab.recipes`` and the
packages below it). Every command runs behind ``common.clean_errors``: an ftlab input error is one red line and exit
code 2.
"""

from __future__ import annotations

import typer

from ftlab import __version__
from ftlab.cli import analyze, edit, evaluate, explain, repair, report, train
from ftlab.cli.common import OneLineErrors

app = typer.Typer(
    help="ftlab: fine-tune language models and measure what they forget.", no_args_is_help=True, cls=OneLineErrors
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ftlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ftlab: fine-tune language models and measure what they forget."""


for module in (train, evaluate, report, repair, explain):
    module.register(app)
app.add_typer(edit.app, name="edit")
app.add_typer(analyze.app, name="analyze")

__all__ = ["app"]
