"""``ftlab train``, ``ftlab run`` and ``ftlab demo``: argument parsing and printing over ``ftlab.recipes``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ftlab.cli.common import command

SET_HELP = "Override a key: --set train.lr=1e-4 (repeatable)."
STORE_OPTION = typer.Option(None, "--store", help="SQLite store (default: $FTLAB_STORE or ~/.local/share).")


def register(app: typer.Typer) -> None:
    command(app)(train)
    command(app, "run")(run)
    command(app)(demo)


def train(
    config: Path = typer.Argument(..., help="YAML run config (see examples/)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Fine-tune a model with one method, as a YAML config says; writes the model under output.dir."""
    from ftlab.config import ConfigError, RunConfig, load_config
    from ftlab.recipes.train import run_train

    cfg = load_config(RunConfig, config, set_)
    try:
        out, result = run_train(cfg)
    except ConfigError as err:  # a setting checked against the data or the method: name the file it came from
        raise ConfigError(f"{config}: {err}") from None
    typer.echo(f"trained {result.steps} steps in {result.train_seconds:.1f}s; {result.trainable_params:,} trainable")
    typer.echo(f"saved to {out}")


def run(
    experiment: Path = typer.Argument(..., help="Experiment YAML (see examples/)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: str | None = typer.Option(None, "--out", help="Output folder (default: the config's `out`)."),
    store: Path | None = STORE_OPTION,
) -> None:
    """Fine-tune one base with several methods (arms) over one or more stages; evaluate, store, summarise."""
    from ftlab import distributed
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import preflight, process_state, run_experiment
    from ftlab.store import Store

    cfg = load_experiment(experiment, set_ + ([f"out={out}"] if out else []))
    if cfg.accelerate and not distributed.launched():  # the same command again, under `accelerate launch`
        args = ["run", str(experiment), *(x for s in set_ for x in ("--set", s))]
        args += [*(["--out", out] if out else []), *(["--store", str(store)] if store else [])]
        typer.echo("relaunching: " + " ".join(distributed.relaunch_command(cfg.accelerate, args)), err=True)
        raise typer.Exit(distributed.relaunch(cfg.accelerate, args))
    suites = preflight(cfg)  # every suite, stage's data and the base: bad input fails before the store is opened
    summary = run_experiment(cfg, Store(store), suites=suites)
    if process_state().is_main_process:  # under `accelerate launch` / `torchrun`, print once
        print_table(summary)
        typer.echo(f"summary: {Path(cfg.out) / 'summary.json'}")


def demo(
    out: str = typer.Option("out/demo", "--out", help="Output folder."),
    steps: int = typer.Option(18, "--steps", min=1, help="Optimizer steps per arm (batch 8)."),
    store: Path | None = STORE_OPTION,
    all_methods: bool = typer.Option(
        False, "--all", help="The previous, longer demo: every method, every retained suite, fp32 training."
    ),
) -> None:
    """The embedded SmolLM2-135M-Instruct learns invented capitals (full, LoRA, HFT), forgets, and a repair sweep wins
    part of it back; prints a table and a report. ``--all`` runs every method."""
    from ftlab.recipes.demo import demo_config
    from ftlab.recipes.run import run_experiment
    from ftlab.report import render_report
    from ftlab.store import Store

    cfg = demo_config(out, steps, all_methods=all_methods)
    st = Store(store)
    summary = run_experiment(cfg, st)
    print_table(summary)
    page = render_report(st, summary["run_id"], Path(out) / "report.html")
    typer.echo(f"report: {page}")
    typer.echo(f"summary: {Path(out) / 'summary.json'}")


def print_table(summary: dict[str, Any], file: Any = None) -> None:
    """A rich table of gain and retained ratios per arm (from ``build_summary``), then the repair lines."""
    from rich.console import Console
    from rich.table import Table

    from ftlab.report.digest import repair_lines

    table = Table(title=f"run {summary['run_id']}: target gain vs retained (1.0 = unchanged)")
    arms = summary["arms"]
    suites = sorted({s for a in arms.values() for s, v in a.get("suites", {}).items() if v["role"] == "retained"})
    suites = suites or sorted({s for a in arms.values() for s in a["retained"]})
    table.add_column("arm")
    table.add_column("target gain", justify="right")
    table.add_column("retention", justify="right")
    for s in suites:
        table.add_column(s, justify="right")
    table.add_column("train s", justify="right")
    table.add_column("trainable", justify="right")
    for name, a in arms.items():
        gain = "-" if a["target_gain"] is None else f"{a['target_gain']:+.3f}{_mark(_target_change(a))}"
        retention = "-" if a.get("retention") is None else f"{a['retention']:.3f}"
        cells = [_cell(a, s) for s in suites]
        table.add_row(name, gain, retention, *cells, f"{a['train_seconds']:.0f}", f"{a['trainable_params']:,}")
    out = Console(file=file or sys.stdout, width=200)
    out.print(table)
    level = summary.get("confidence", 0.95)
    out.print(
        f"retained suites: after/before (1.0 = unchanged); * a significant change from the base (paired test over "
        f"the same items, {level:.0%}); floor: the base is not clearly above the suite's floor, so no ratio is shown "
        "and the suite is left out of retention (the mean of the ratios, each capped at 1)"
    )
    for line in repair_lines(summary):
        out.print(line)
    if summary.get("recommended"):
        out.print(recommended_line(summary["recommended"]))


def recommended_line(rec: dict[str, Any]) -> str:
    """One line on the run's recommended model (``keep:``): the point, its gain and retention, or the closest miss."""
    if not rec.get("met"):
        return (
            f"keep {rec.get('keep')}: no point of arm {rec.get('arm')} met the budget "
            f"({rec.get('reason') or 'none'}); closest: {rec.get('closest')}"
        )
    kept = ", ".join(f"{s} {r:.2f}" for s, r in (rec.get("retention") or {}).items())
    gain = rec.get("target_gain")
    return (
        f"recommended (keep {rec.get('keep')}): {rec.get('name')} (target gain {gain:+.3f}; kept {kept}) "
        f"after {rec.get('evaluated')} evaluations, saved at {rec.get('model')}"
    )


def _mark(entry: dict[str, Any] | None) -> str:
    return "*" if entry and entry.get("significant") else ""


def _target_change(arm: dict[str, Any]) -> dict[str, Any] | None:
    """The figures of the arm's target suite when it has exactly one (the gain is then that suite's change)."""
    targets = [v for v in arm.get("suites", {}).values() if v["role"] == "target"]
    return targets[0] if len(targets) == 1 else None


def _cell(arm: dict[str, Any], suite: str) -> str:
    entry = arm.get("suites", {}).get(suite)
    if entry is not None and entry["floor"]:
        return "floor"
    if suite not in arm["retained"]:
        return "-"
    return f"{arm['retained'][suite]:.3f}{_mark(entry)}"
