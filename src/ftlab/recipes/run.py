"""Run an experiment: evaluate the base once, train every arm through every stage, evaluate, sweep repairs, summarise.

Run it with ``ftlab run EXPERIMENT.yaml [--set key=value] [--out DIR]``, or from Python with
``run_experiment(load_experiment(path))``. Multi-GPU: ``accelerate launch -m ftlab run EXPERIMENT.yaml`` runs
the same code (on CPU-only machines start the processes with ``torchrun``: ``accelerate launch --cpu`` starts
one): every process trains (the trainers are accelerate-aware), and only the main process evaluates,
writes the store, saves models and runs repair sweeps while the others wait at a barrier. Evaluation is not split
across processes, so a long evaluation can outlast the process group's timeout (30 minutes by default); raise it
with accelerate's settings for long suites.

The summary (``summary.json``) comes from ``ftlab.report.digest.build_summary``, the one builder that the printed
table, the HTML report and ``ftlab compare`` also read.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ftlab.atomic import write_json, write_text
from ftlab.config import ConfigError
from ftlab.data import load_records
from ftlab.data.sources import resolve_train_data
from ftlab.models import load_model, save_model, state_dict_fp32
from ftlab.recipes.experiment import (
    ArmConfig,
    ExperimentConfig,
    StageConfig,
    all_suites,
    arm_dir,
    arm_trainer,
    git_sha,
    masked_thought_settings,
    run_id_for,
    stage_model_dir,
    sweep_points,
    train_config,
    trainer_settings,
    versions,
)
from ftlab.recipes.trainers import TRAINERS
from ftlab.store import Store
from ftlab.train.stage import StageJob

console = Console(stderr=True)

# Written into the output folder when a run starts; its absence means the folder holds none of the run's work.
RUN_MARKER = ".ftlab-run"


class Evaluator:
    """Loads each suite once and scores models on it, writing results and items to the store."""

    def __init__(self, cfg: ExperimentConfig, store: Store, run_id: str, enabled: bool = True) -> None:
        from ftlab.evals import load_suite

        self.cfg, self.store, self.run_id, self.enabled = cfg, store, run_id, enabled
        self.targets, self.retained = all_suites(cfg)
        self.suites = {}
        for name in self.targets + self.retained:
            limit = cfg.eval.limits.get(name, cfg.eval.limit)
            self.suites[name] = load_suite(
                name, scorer=cfg.eval.scorers.get(name), limit=limit, lm_eval_include=cfg.eval.lm_eval_include
            )

    @property
    def names(self) -> list[str]:
        return self.targets + self.retained

    def missing(self, arm: str, stage: int) -> list[str]:
        return [s for s in self.names if not self.store.has_result(self.run_id, arm, stage, self.suites[s].name)]

    def run(self, model: Any, tokenizer: Any, arm: str, stage: int) -> None:
        from ftlab.evals import evaluate

        if not self.enabled:  # a non-main process of a multi-process run
            return
        for name in self.missing(arm, stage):
            result = evaluate(
                model, tokenizer, self.suites[name], batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens.get(name),
            )  # fmt: skip
            role = "target" if name in self.targets else "retained"
            self.store.add_result(self.run_id, arm, stage, role, result)
            console.print(f"  [dim]{arm} stage {stage}[/] {name}: {result.metric} = {result.score:.3f}")


def stage_records(cfg: ExperimentConfig, stage: StageConfig) -> tuple[list[dict], str]:
    """The stage's training records after mixing and replay (deterministic in the experiment's seed)."""
    from ftlab.data.mixing import mix

    named = {st.name: st for st in cfg.stages}

    def source(ref: str) -> list[dict]:
        if ref.startswith("stage:"):
            return stage_data(cfg, named[ref[6:]])[0]
        return load_records(resolve_train_data(ref), "auto")[0]

    records, fmt = stage_data(cfg, stage)
    if stage.mix:
        others = [source(ref) for ref in stage.mix]
        records = mix([records, *others], [1.0, *stage.mix.values()], seed=cfg.seed)
    for ref, fraction in stage.replay.items():
        extra = source(ref)
        records = records + random.Random(cfg.seed).sample(extra, round(fraction * len(extra)))
    return records, fmt


def stage_data(cfg: ExperimentConfig, stage: StageConfig) -> tuple[list[dict], str]:
    """The records a stage's ``data`` names: one source, or the shuffled union of several (all in one format); the
    stage's ``split`` and ``columns`` apply to each source."""
    from ftlab.data.sources import load_train_data

    refs = stage.data if isinstance(stage.data, list) else [stage.data]
    records: list[dict] = []
    formats = set()
    for ref in refs:
        got, fmt = load_train_data(ref, stage.format, stage.limit, stage.split, stage.columns)
        records += got
        formats.add(fmt)
    if len(formats) > 1:
        raise ConfigError(
            f"stages.{stage.name}.data: the sources have different formats ({', '.join(sorted(formats))})"
        )
    if len(refs) > 1:
        random.Random(cfg.seed).shuffle(records)
    return records, formats.pop()


def train_stage(
    model: Any, tokenizer: Any, cfg: ExperimentConfig, stage: StageConfig, arm: ArmConfig, t: int, work: Path
) -> Any:
    """Train one arm through stage ``t`` (1-based) with its registered trainer; returns a TrainResult."""
    records, fmt = stage_records(cfg, stage)
    job = StageJob(
        model=model, tokenizer=tokenizer, records=records, fmt=fmt, method=arm.method,
        train=train_config(cfg, stage, arm), work_dir=work, stage=t - 1, settings=trainer_settings(stage, arm),
        max_length=stage.max_length, masked_thought=masked_thought_settings(stage, arm), resume=True,
        load_base=lambda: load_model(cfg.base)[0], seed=cfg.seed,
    )  # fmt: skip
    return TRAINERS[arm_trainer(stage, arm)].train(job)


def run_arm(cfg: ExperimentConfig, arm: ArmConfig, store: Store, run_id: str, ev: Evaluator, out: Path) -> None:
    """All stages of one arm, then its repair sweep; finished work is skipped."""
    ranks = process_state()
    n = len(cfg.stages)
    store.add_arm(run_id, arm.name, "train", arm.method.name, None, {"method": vars(arm.method), "train": arm.train})
    model = tokenizer = None
    for t, stage in enumerate(cfg.stages, start=1):
        model_dir = stage_model_dir(out, arm.name, t, n)
        done = store.stage_done(run_id, arm.name, t) and (model_dir / "config.json").exists()
        needs_model = not done or ev.missing(arm.name, t) or (t == n and arm.post)
        next_needs = t < n and not store.stage_done(run_id, arm.name, t + 1)
        if done:
            if needs_model or next_needs:
                model, tokenizer = load_model(model_dir)
            else:
                model = None
        else:
            if model is None:
                prev = cfg.base if t == 1 else stage_model_dir(out, arm.name, t - 1, n)
                model, tokenizer = load_model(prev)
            console.print(f"[bold]{arm.name}[/]: training stage {t} ({stage.name}, {arm_trainer(stage, arm)})")
            work = arm_dir(out, arm.name) / f"stage-{t}.work"
            result = train_stage(model, tokenizer, cfg, stage, arm, t, work)
            model = result.final_model()
            if ranks.is_main_process:
                save_model(model, tokenizer, model_dir)
                shutil.rmtree(work, ignore_errors=True)
            store.finish_stage(
                run_id, arm.name, t, stage.name,
                train_seconds=result.train_seconds, trainable_params=result.trainable_params,
                optimizer_state_bytes=result.optimizer_state_bytes, steps=result.steps,
                model_path=str(model_dir), info=result.plan_info,
            )  # fmt: skip
            ranks.wait_for_everyone()
        if model is not None:
            ev.run(model, tokenizer, arm.name, t)
    store.add_artifact(run_id, arm.name, "model", str(stage_model_dir(out, arm.name, n, n)))
    if arm.post and model is not None and ranks.is_main_process:
        run_sweep(cfg, arm, store, run_id, ev, model, tokenizer)
    ranks.wait_for_everyone()


def run_sweep(
    cfg: ExperimentConfig, arm: ArmConfig, store: Store, run_id: str, ev: Evaluator, model: Any, tokenizer: Any
) -> None:
    """Score each repair point of an arm's final model; weight edits are applied in place and undone after.

    The edits come from ``ftlab.edits.EDITS``: a weight edit's state dict is loaded into the tuned model, a
    decode-time composite is built over the base and tuned models and scored as a model.
    """
    from ftlab.edits import EDITS, apply_edit

    n = len(cfg.stages)
    points = [p for p in sweep_points(arm) if ev.missing(p[0], n)]
    if not points:
        return
    base_model, _ = load_model(cfg.base)
    base_sd = state_dict_fp32(base_model)
    tuned_sd = state_dict_fp32(model)
    for name, edit, settings in points:
        store.add_arm(run_id, name, "edit", edit, arm.name, {"edit": edit, "settings": settings})
        console.print(f"[bold]{name}[/]: repair point")
        if EDITS[edit].composite:
            ev.run(EDITS[edit].apply(base_model, model, **settings), tokenizer, name, n)
            continue
        model.load_state_dict(apply_edit(edit, base_sd, tuned_sd, **settings), strict=False)
        ev.run(model, tokenizer, name, n)
    model.load_state_dict(tuned_sd, strict=False)
    del base_model


def process_state() -> Any:
    """Accelerate's view of the processes of this run: one, or several under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    from ftlab.train.trainer_args import cpu_process_group

    return PartialState(cpu=cpu_process_group())


def run_experiment(cfg: ExperimentConfig, store: Store | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the summary that is also written to ``<out>/summary.json``.

    Args:
        cfg: a validated experiment config.
        store: the store to write (default: ``Store()``, i.e. ``$FTLAB_STORE`` or ``~/.local/share/ftlab``).

    Returns:
        The summary dict (see ``ftlab.report.digest.build_summary``).
    """
    from ftlab.config import to_dict
    from ftlab.report.digest import build_summary

    torch.manual_seed(cfg.seed)
    ranks = process_state()
    store = store or Store()
    if not ranks.is_main_process:
        store = Store(store.path, read_only=True)
    out = Path(cfg.out)
    run_id = run_id_for(cfg)

    # loads every suite first: a bad suite file fails before anything is written
    ev = Evaluator(cfg, store, run_id, enabled=ranks.is_main_process)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        **to_dict(cfg),
        "suite_names": {ref: suite.name for ref, suite in ev.suites.items()},
        "suite_floors": {suite.name: suite.floor for suite in ev.suites.values()},
    }
    marker = out / RUN_MARKER
    if ranks.is_main_process:
        if store.run(run_id) and not marker.exists():
            # The store knows this run but its output folder is new (deleted or never made here): start afresh
            # rather than reuse scores of models that no longer exist.
            console.print(f"run {run_id}: output folder {out} is new; earlier results of this run are dropped")
            store.forget_run(run_id)
        store.start_run(run_id, cfg.name, str(out.resolve()), config, cfg.seed, git_sha(), versions())
        write_text(marker, run_id + "\n")
    ranks.wait_for_everyone()
    console.print(f"run [bold]{run_id}[/] -> {out}  (store {store.path})")
    store.add_arm(run_id, "base", "base", "none", None, {"model": cfg.base})
    if ranks.is_main_process and ev.missing("base", 0):
        base, tok = load_model(cfg.base)
        console.print("[bold]base[/]: evaluating once for every arm")
        ev.run(base, tok, "base", 0)
        del base
    for arm in cfg.arms:
        run_arm(cfg, arm, store, run_id, ev, out)  # ends at a barrier, so every store write is in
    summary = build_summary(store, run_id)
    if ranks.is_main_process:
        write_json(out / "summary.json", summary)
        store.finish_run(run_id)
        log_to_trackers(cfg, summary, out)
    return summary


def log_to_trackers(cfg: ExperimentConfig, summary: dict[str, Any], out: Path) -> None:
    """Log the run's scores and retention figures into the tracker runs its training reported to (``train.report_to``;
    the base goes to every tracker any arm names). ``ftlab.trackers`` places the runs."""
    from ftlab.trackers import log_summary

    configs = {(a.name, t): train_config(cfg, st, a) for a in cfg.arms for t, st in enumerate(cfg.stages, start=1)}
    names = list(dict.fromkeys(name for c in configs.values() for name in c.report_to))
    if not names:
        return
    base = dataclasses.replace(train_config(cfg, cfg.stages[0], ArmConfig()), report_to=names)
    used = log_summary(summary, out, lambda arm, t: configs[arm, t] if arm else base)
    console.print(f"scores and retention logged to {', '.join(used)}")
