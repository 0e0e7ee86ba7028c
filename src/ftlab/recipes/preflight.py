"""Checks before ``ftlab run`` writes anything: suites loaded, stage data and model references read, memory planned.

Every check here raises a clear error (file, line, field) before the output folder or a store row exists.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ftlab.data import load_records
from ftlab.data.sources import resolve_train_data
from ftlab.recipes.experiment import (
    ExperimentConfig,
    all_suites,
    train_config,
)

console = Console(stderr=True)


def conjugate_suites(suites: list[Any], forms: list[str]) -> dict[str, Any]:
    """``{"<suite>@<form>": suite}`` for each retained suite and form that applies (``ftlab.evals.conjugate``)."""
    from ftlab.evals.conjugate import conjugate_suite

    out = {}
    for suite in suites:
        for form in forms:
            rewritten = conjugate_suite(suite, form)
            if rewritten is None:
                console.print(f"[dim]conjugate: the {form} form does not apply to {suite.name}; skipped[/]")
            else:
                out[rewritten.name] = rewritten
    return out


def load_suites(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every target and retained suite of the experiment, by reference, with its limit and scorer."""
    from ftlab.evals import load_suite

    suites = {}
    for name in sum(all_suites(cfg), []):
        limit = cfg.eval.limits.get(name, cfg.eval.limit)
        suites[name] = load_suite(
            name, scorer=cfg.eval.scorers.get(name), limit=limit, lm_eval_include=cfg.eval.lm_eval_include
        )
    return suites


def preflight(cfg: ExperimentConfig) -> dict[str, Any]:
    """Read everything a run reads before it writes anything: every suite, every stage's data and the sources it
    mixes or replays, and the base model reference (its folder, config and weight files; no weights load).

    Returns:
        The loaded suites, by reference (``Evaluator(suites=...)``).

    Raises:
        InputError: naming the file, line or row, and field of the first problem.
    """
    from ftlab.recipes.run import stage_data  # the same reading the run does (run.py imports this module)

    suites = load_suites(cfg)
    for stage in cfg.stages:
        stage_data(cfg, stage)
        for ref in [*stage.mix, *stage.replay]:
            if not ref.startswith("stage:"):
                load_records(resolve_train_data(ref), "auto")
    check_model_ref(cfg.base)
    plan_arms(cfg)
    return suites


def plan_arms(cfg: ExperimentConfig) -> None:
    """Print each arm's memory plan (``ftlab.memory``: weights, gradients, optimizer state, activations) and refuse
    an arm that cannot fit the device, before anything loads (an arm's ``train.memory_check: false`` only prints).
    Under several processes (FSDP, DeepSpeed) the plan is printed once and not checked: sharding is not modelled."""
    import os

    from ftlab.loading import check_device
    from ftlab.memory import announce, plan_or_note, print_plan

    check_device(cfg.load)  # bf16 weights on a GPU without bf16
    seq = max(stage.max_length for stage in cfg.stages)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for arm in cfg.arms:
        train = train_config(cfg, cfg.stages[0], arm)
        title = f"memory plan: arm {arm.name} ({arm.method.name} on {cfg.base})"
        if several:
            plan = plan_or_note(cfg.base, cfg.load, arm.method.name, arm.method.params, train, seq)
            if plan is not None and int(os.environ.get("RANK", "0")) == 0:
                print_plan(plan, title + ", one process's full copy; sharding is not counted")
            continue
        announce(cfg.base, cfg.load, arm.method.name, arm.method.params, train, seq, title, f"arms.{arm.name}")


def check_model_ref(ref: str) -> None:
    """Check a model reference without loading weights (``ftlab.models.resolve``); an adapter folder's recorded
    base is checked in its place."""
    from ftlab.diffs import is_diff
    from ftlab.models import EMBEDDED_NAME, TINY_NAME, adapter_base, resolve

    if ref in (TINY_NAME, EMBEDDED_NAME) or is_diff(ref):
        return
    recorded = adapter_base(ref)
    if recorded is None:
        resolve(ref)
    elif recorded:
        check_model_ref(recorded)
