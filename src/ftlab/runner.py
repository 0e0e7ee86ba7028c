"""Run an experiment: evaluate the base once, train every arm through every stage, evaluate, sweep repairs, summarise.

Run it with ``ftlab run EXPERIMENT.yaml [--set key=value] [--out DIR]``, or from Python with
``run_experiment(load_experiment(path))``. Multi-GPU: ``accelerate launch -m ftlab run EXPERIMENT.yaml`` runs
the same code (on CPU-only machines start the processes with ``torchrun``: ``accelerate launch --cpu`` starts
one): every process trains (the trainers are accelerate-aware), and only the main process evaluates,
writes the store, saves models and runs repair sweeps while the others wait at a barrier. Evaluation is not split
across processes, so a long evaluation can outlast the process group's timeout (30 minutes by default); raise it
with accelerate's settings for long suites.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ftlab.config import ConfigError
from ftlab.data import load_records, sft_dataset
from ftlab.data.sources import resolve_train_data
from ftlab.experiment import (
    ArmConfig,
    ExperimentConfig,
    StageConfig,
    _git_sha,
    _versions,
    all_suites,
    arm_dir,
    clean_work,
    run_id_for,
    stage_model_dir,
    sweep_points,
    train_config,
)
from ftlab.models import load_model, save_model, state_dict_fp32
from ftlab.store import Store

console = Console(stderr=True)


class Evaluator:
    """Loads each suite once and scores models on it, writing results and items to the store."""

    def __init__(self, cfg: ExperimentConfig, store: Store, run_id: str, enabled: bool = True) -> None:
        from ftlab.evals import load_suite

        self.cfg, self.store, self.run_id, self.enabled = cfg, store, run_id, enabled
        self.targets, self.retained = all_suites(cfg)
        self.suites = {}
        for name in self.targets + self.retained:
            limit = cfg.eval.limits.get(name, cfg.eval.limit)
            self.suites[name] = load_suite(name, scorer=cfg.eval.scorers.get(name), limit=limit)

    def missing(self, arm: str, stage: int, names: list[str]) -> list[str]:
        return [s for s in names if not self.store.has_result(self.run_id, arm, stage, self.suites[s].name)]

    def run(self, model: Any, tokenizer: Any, arm: str, stage: int, names: list[str]) -> None:
        from ftlab.evals import evaluate

        if not self.enabled:  # a non-main process of a multi-process run
            return
        for name in self.missing(arm, stage, names):
            result = evaluate(
                model, tokenizer, self.suites[name], batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens.get(name),
            )  # fmt: skip
            role = "target" if name in self.targets else "retained"
            self.store.add_result(self.run_id, arm, stage, role, result)
            console.print(f"  [dim]{arm} stage {stage}[/] {name}: {result.metric} = {result.score:.3f}")


def stage_records(cfg: ExperimentConfig, stage: StageConfig) -> tuple[list[dict], str]:
    """The stage's training records after mixing and replay (deterministic in the experiment's seed)."""
    import random

    from ftlab.data.mixing import mix

    def source(ref: str) -> tuple[list[dict], str]:
        if ref.startswith("stage:"):
            named = {st.name: st for st in cfg.stages}
            if ref[6:] not in named:
                raise ConfigError(f"stages.{stage.name}: no stage named {ref[6:]!r} to replay")
            return load_records(resolve_train_data(named[ref[6:]].data), named[ref[6:]].format, named[ref[6:]].limit)
        return load_records(resolve_train_data(ref), "auto")

    records, fmt = load_records(resolve_train_data(stage.data), stage.format, stage.limit)
    if stage.mix:
        others = [source(ref)[0] for ref in stage.mix]
        records = mix([records, *others], [1.0, *stage.mix.values()], seed=cfg.seed)
    for ref, fraction in stage.replay.items():
        extra = source(ref)[0]
        records = records + random.Random(cfg.seed).sample(extra, round(fraction * len(extra)))
    if stage.trainer == "sft" and fmt == "verifiable":  # SFT on a verifiable task learns the reference answer
        records = [
            {**r, "completion": r["answer"] if isinstance(r["answer"], str) else r["answer"][0]} for r in records
        ]
        fmt = "completion"
    return records, fmt


def train_stage(
    model: Any, tokenizer: Any, cfg: ExperimentConfig, stage: StageConfig, arm: ArmConfig, t: int, work: Path
) -> Any:
    """Train one arm through one stage with the stage's trainer; returns a TrainResult."""
    trainer = arm.trainer or stage.trainer
    stage = dataclasses.replace(stage, trainer=trainer, settings={**stage.settings, **arm.settings})
    records, fmt = stage_records(cfg, stage)
    train = train_config(cfg, stage, arm)
    if trainer == "sft":
        from ftlab.train.sft import train_sft

        dataset = sft_dataset(records, fmt, tokenizer, stage.max_length)
        collator, callbacks = None, []
        if arm.masked_thought:
            from ftlab.data.masked_thought import MaskedThoughtCollator

            collator = MaskedThoughtCollator(tokenizer, seed=cfg.seed, **arm.masked_thought)
            callbacks = [collator.callback()]
        return train_sft(
            model, tokenizer, dataset, arm.method, train, work, stage=t - 1, max_length=stage.max_length,
            resume=True, callbacks=callbacks, data_collator=collator,
        )  # fmt: skip
    if trainer == "grpo":
        from ftlab.train.grpo import GRPOSettings, train_grpo

        settings = GRPOSettings(**stage.settings)
        return train_grpo(model, tokenizer, records, arm.method, train, work, grpo=settings, stage=t - 1, resume=True)
    from ftlab.train.dpo import DPOSettings, train_dpo

    settings = DPOSettings(**stage.settings)
    return train_dpo(model, tokenizer, records, arm.method, train, work, dpo=settings, stage=t - 1, resume=True)


def run_arm(cfg: ExperimentConfig, arm: ArmConfig, store: Store, run_id: str, ev: Evaluator, out: Path) -> None:
    """All stages of one arm, then its repair sweep; finished work is skipped."""
    ranks = process_state()
    n = len(cfg.stages)
    store.add_arm(run_id, arm.name, "train", arm.method.name, None, {"method": vars(arm.method), "train": arm.train})
    model = tokenizer = None
    for t, stage in enumerate(cfg.stages, start=1):
        model_dir = stage_model_dir(out, arm.name, t, n)
        done = store.stage_done(run_id, arm.name, t) and (model_dir / "config.json").exists()
        eval_names = ev.targets + ev.retained
        needs_model = not done or ev.missing(arm.name, t, eval_names) or (t == n and arm.post)
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
            console.print(f"[bold]{arm.name}[/]: training stage {t} ({stage.name}, {arm.trainer or stage.trainer})")
            work = arm_dir(out, arm.name) / f"stage-{t}.work"
            result = train_stage(model, tokenizer, cfg, stage, arm, t, work)
            model = result.final_model()
            if ranks.is_main_process:
                save_model(model, tokenizer, model_dir)
                clean_work(work)
            store.finish_stage(
                run_id, arm.name, t, stage.name,
                train_seconds=result.train_seconds, trainable_params=result.trainable_params,
                optimizer_state_bytes=result.optimizer_state_bytes, steps=result.steps,
                model_path=str(model_dir), info=result.plan_info,
            )  # fmt: skip
            ranks.wait_for_everyone()
        if model is not None:
            ev.run(model, tokenizer, arm.name, t, eval_names)
    store.add_artifact(run_id, arm.name, "model", str(stage_model_dir(out, arm.name, n, n)))
    if arm.post and model is not None and ranks.is_main_process:
        run_sweep(cfg, arm, store, run_id, ev, model, tokenizer)
    ranks.wait_for_everyone()


def run_sweep(
    cfg: ExperimentConfig, arm: ArmConfig, store: Store, run_id: str, ev: Evaluator, model: Any, tokenizer: Any
) -> None:
    """Score each repair point of an arm's final model; weight edits are applied in place and undone after."""
    from ftlab.edits import apply_edit

    n = len(cfg.stages)
    names = ev.targets + ev.retained
    points = [p for p in sweep_points(arm) if ev.missing(p[0], n, names)]
    if not points:
        return
    base_model, _ = load_model(cfg.base)
    base_sd = state_dict_fp32(base_model)
    tuned_sd = state_dict_fp32(model)
    for name, edit, settings in points:
        store.add_arm(run_id, name, "edit", edit, arm.name, {"edit": edit, "settings": settings})
        console.print(f"[bold]{name}[/]: repair point")
        if edit == "tuco":
            from ftlab.edits import TuCoModel

            ev.run(TuCoModel(base_model, model, **settings), tokenizer, name, n, names)
            continue
        edited = apply_edit(edit, base_sd, tuned_sd, **settings)
        model.load_state_dict(edited, strict=False)
        ev.run(model, tokenizer, name, n, names)
    model.load_state_dict(tuned_sd, strict=False)
    del base_model


def process_state() -> Any:
    """Accelerate's view of the processes of this run: one, or several under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    from ftlab.train.trainer_args import cpu_process_group

    return PartialState(cpu=cpu_process_group())


# Written into the output folder when a run starts; its absence means the folder holds none of the run's work.
RUN_MARKER = ".ftlab-run"


def run_experiment(cfg: ExperimentConfig, store: Store | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the summary that is also written to ``<out>/summary.json``.

    Args:
        cfg: a validated experiment config.
        store: the store to write (default: ``Store()``, i.e. ``$FTLAB_STORE`` or ``~/.local/share/ftlab``).

    Returns:
        The summary dict (see ``summarise``).
    """
    from ftlab.config import to_dict

    torch.manual_seed(cfg.seed)
    ranks = process_state()
    store = store or Store()
    if not ranks.is_main_process:
        store = Store(store.path, read_only=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id_for(cfg)

    # loads every suite first: a bad suite file fails before any training
    ev = Evaluator(cfg, store, run_id, enabled=ranks.is_main_process)
    config = {**to_dict(cfg), "suite_names": {ref: suite.name for ref, suite in ev.suites.items()}}
    marker = out / RUN_MARKER
    if ranks.is_main_process:
        if store.run(run_id) and not marker.exists():
            # The store knows this run but its output folder is new (deleted or never made here): start afresh
            # rather than reuse scores of models that no longer exist.
            console.print(f"run {run_id}: output folder {out} is new; earlier results of this run are dropped")
            store.forget_run(run_id)
        store.start_run(run_id, cfg.name, str(out.resolve()), config, cfg.seed, _git_sha(), _versions())
        marker.write_text(run_id + "\n")
    ranks.wait_for_everyone()
    console.print(f"run [bold]{run_id}[/] -> {out}  (store {store.path})")
    store.add_arm(run_id, "base", "base", "none", None, {"model": cfg.base})
    if ranks.is_main_process and ev.missing("base", 0, ev.targets + ev.retained):
        base, tok = load_model(cfg.base)
        console.print("[bold]base[/]: evaluating once for every arm")
        ev.run(base, tok, "base", 0, ev.targets + ev.retained)
        del base
    for arm in cfg.arms:
        run_arm(cfg, arm, store, run_id, ev, out)  # ends at a barrier, so every store write is in
    summary = summarise(store, run_id)
    if ranks.is_main_process:
        write_json(out / "summary.json", summary)
        store.finish_run(run_id)
    return summary


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def summarise(store: Store, run_id: str) -> dict[str, Any]:
    """The run's figures from the store.

    ``{"run_id", "base": {suite: score}, "arms": {arm: {"stages": [{suite: score}], "target_gain",
    "retained": {suite: ratio}, "train_seconds", "trainable_params", "kind", "parent"}}}``; continual runs (two or
    more stages) add ``"matrix"`` (R, rows 0..T over the stages' targets) and ``"continual"`` (acc, bwt, fwt,
    forgetting) per trained arm. Target gain is the mean over all target suites of final minus base score;
    retained is final/base per retained suite (base/final for perplexity).
    """
    from ftlab.evals.forgetting import continual_metrics, retained_ratio, target_gain

    run = store.run(run_id)
    cfg = json.loads(run["config"])
    n = len(cfg["stages"])
    rows = store.results(run_id)
    score: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        score.setdefault((r["arm"], r["stage"]), {})[r["suite"]] = r
    base = {s: r["score"] for s, r in score.get(("base", 0), {}).items()}
    names = cfg.get("suite_names", {})  # the config names suites by reference; the store by suite name
    stage_targets = [[names.get(s, s) for s in st.get("targets", [])] for st in cfg["stages"]]
    summary: dict[str, Any] = {"run_id": run_id, "name": run["name"], "base": base, "arms": {}}
    for arm in store.arms(run_id):
        if arm["kind"] == "base":
            continue
        name = arm["arm"]
        trained = arm["parent"] or name
        stages = store.stages(run_id, trained)
        first = 1 if arm["kind"] == "train" else n
        per_stage = [{s: r["score"] for s, r in score.get((name, t), {}).items()} for t in range(first, n + 1)]
        final = score.get((name, n), {})
        gains = [
            target_gain(base[s], final[s]["score"]) for st in stage_targets for s in st if s in final and s in base
        ]
        retained = {
            s: retained_ratio(base[s], r["score"], bool(r["higher_is_better"]))
            for s, r in final.items()
            if r["role"] == "retained" and s in base
        }
        entry = {
            "kind": arm["kind"],
            "parent": arm["parent"],
            "stages": per_stage,
            "target_gain": sum(gains) / len(gains) if gains else None,
            "retained": retained,
            "train_seconds": sum(s["train_seconds"] or 0.0 for s in stages),
            "trainable_params": max((s["trainable_params"] or 0 for s in stages), default=0),
        }
        if arm["kind"] == "train" and n >= 2:
            tasks = [st[0] for st in stage_targets if st]
            if len(tasks) == n:
                matrix = [[score.get((name if t else "base", t), {}).get(s, {}).get("score") for s in tasks]
                          for t in range(n + 1)]  # fmt: skip
                if all(v is not None for row in matrix for v in row):
                    entry["matrix"] = {"tasks": tasks, "R": matrix}
                    entry["continual"] = continual_metrics(matrix)
        summary["arms"][name] = entry
    return summary


def print_table(summary: dict[str, Any], file: Any = None) -> None:
    """A rich table of gain and retained ratios per arm."""
    from rich.table import Table

    table = Table(title=f"run {summary['run_id']}: target gain vs retained (1.0 = unchanged)")
    suites = sorted({s for a in summary["arms"].values() for s in a["retained"]})
    table.add_column("arm")
    table.add_column("target gain", justify="right")
    for s in suites:
        table.add_column(s, justify="right")
    table.add_column("train s", justify="right")
    table.add_column("trainable", justify="right")
    for name, a in summary["arms"].items():
        gain = "-" if a["target_gain"] is None else f"{a['target_gain']:+.3f}"
        cells = [f"{a['retained'][s]:.3f}" if s in a["retained"] else "-" for s in suites]
        table.add_row(name, gain, *cells, f"{a['train_seconds']:.0f}", f"{a['trainable_params']:,}")
    console_out = Console(file=file or sys.stdout, width=200)
    console_out.print(table)
    for line in repair_lines(summary):
        console_out.print(line)


# A repair point is worth naming when it keeps at least this share of its arm's target gain.
KEEP_GAIN = 0.8


def repair_lines(summary: dict[str, Any]) -> list[str]:
    """One line per arm with a repair sweep: the point that wins back most of what the arm forgot, keeping the gain.

    "What it forgot" is the arm's worst retained suite (lowest ratio). Among the arm's points that keep at least
    ``KEEP_GAIN`` of its target gain, the one with the highest ratio on that suite is named, if it beats the arm.
    """
    arms = summary["arms"]
    lines = []
    for name, arm in arms.items():
        points = {k: v for k, v in arms.items() if k.startswith(name + "+")}
        if not points or not arm["retained"] or (arm["target_gain"] or 0) <= 0:
            continue
        worst = min(arm["retained"], key=arm["retained"].get)
        keep = {k: v for k, v in points.items() if (v["target_gain"] or 0) >= KEEP_GAIN * arm["target_gain"]}
        best = max(keep, key=lambda k: keep[k]["retained"].get(worst, 0.0), default=None)
        if best is None or keep[best]["retained"].get(worst, 0.0) <= arm["retained"][worst]:
            lines.append(f"repair of {name}: no point keeps {KEEP_GAIN:.0%} of the gain and recovers {worst}")
            continue
        p = keep[best]
        lines.append(
            f"repair of {name}: {best} keeps {p['target_gain'] / arm['target_gain']:.0%} of the gain and brings "
            f"{worst} from {arm['retained'][worst]:.2f} to {p['retained'][worst]:.2f} of the base"
        )
    return lines
