"""Run an experiment: evaluate the base once, train every arm through every stage, evaluate, sweep repairs, summarise.

Run it with ``ftlab run EXPERIMENT.yaml [--set key=value] [--out DIR]``, or from Python with
``run_experiment(load_experiment(path))``. Multi-GPU: ``accelerate launch -m ftlab run EXPERIMENT.yaml`` runs
the same code (on CPU-only machines start the processes with ``torchrun``: ``accelerate launch --cpu`` starts
one): every process trains (the trainers are accelerate-aware) and scores its share of every suite's items
(the main process gathers and writes them); only the main process writes the store, saves models and runs repair
sweeps while the others wait at a barrier, so a long sweep can outlast the process group's timeout (30 minutes by
default); raise it with accelerate's settings. An experiment's ``accelerate:`` key makes ``ftlab run`` relaunch
itself under ``accelerate launch`` (``ftlab.distributed``). Each stage's output is saved as ``save_output`` says: a
PEFT adapter, a weight diff (``ftlab.diffs``) or a whole model.

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

from ftlab import faults
from ftlab.atomic import remove_temps, write_json, write_text
from ftlab.config import ConfigError
from ftlab.data import load_records
from ftlab.data.sources import resolve_train_data
from ftlab.diffs import output_kind
from ftlab.models import load_model, save_model, state_dict_fp32
from ftlab.recipes.experiment import (
    ArmConfig,
    ExperimentConfig,
    StageConfig,
    all_suites,
    arm_dir,
    arm_keep,
    arm_trainer,
    context_indicator,
    git_sha,
    masked_thought_settings,
    run_id_for,
    save_mode,
    stage_model_dir,
    sweep_points,
    train_config,
    trainer_settings,
    versions,
)
from ftlab.recipes.preflight import conjugate_suites, load_suites, preflight
from ftlab.recipes.trainers import TRAINERS
from ftlab.store import Store
from ftlab.train.stage import StageJob

console = Console(stderr=True)

# Written into the output folder when a run starts; its absence means the folder holds none of the run's work.
RUN_MARKER = ".ftlab-run"


class Evaluator:
    """Loads each suite once and scores models on it, writing results and items to the store."""

    def __init__(
        self, cfg: ExperimentConfig, store: Store, run_id: str, enabled: bool = True, suites: dict | None = None
    ) -> None:
        self.cfg, self.store, self.run_id, self.enabled = cfg, store, run_id, enabled
        self.targets, self.retained = all_suites(cfg)
        self.suites = load_suites(cfg) if suites is None else suites
        self.conjugates = conjugate_suites([self.suites[name] for name in self.retained], cfg.eval.conjugate)

    @property
    def names(self) -> list[str]:
        return self.targets + self.retained

    def missing(self, arm: str, stage: int, conjugate: bool = False) -> list[str]:
        """Suites (references) without a stored result; with ``conjugate``, also the conjugate forms' names."""
        names = [s for s in self.names if not self.store.has_result(self.run_id, arm, stage, self.suites[s].name)]
        if conjugate:
            names += [c for c in self.conjugates if not self.store.has_result(self.run_id, arm, stage, c)]
        return names

    def run(
        self, model: Any, tokenizer: Any, arm: str, stage: int, conjugate: bool = False, split: bool = True
    ) -> None:
        """Score the missing suites; ``conjugate`` adds the retained suites asked in ``eval.conjugate``'s forms
        (stored under ``<suite>@<form>`` with role ``conjugate``; the base and each trained arm's last stage).

        In a multi-process run with ``split`` every process calls this together: each scores its share of every
        suite's items and the main process gathers the rows and writes them (``evaluate(split=True)``); the list of
        missing suites is the main process's. ``split=False`` scores on this process alone (the repair sweep, which
        runs on the main process only).
        """
        from ftlab import distributed
        from ftlab.evals import evaluate

        together = split and distributed.world_size() > 1
        if not together and not self.enabled:  # a non-main process of a multi-process run
            return
        names = self.missing(arm, stage, conjugate)
        for name in distributed.broadcast(names) if together else names:
            suite = self.suites.get(name) or self.conjugates[name]
            source = name.rpartition("@")[0] if name in self.conjugates else name
            result = evaluate(
                model, tokenizer, suite, batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens.get(source), split=together,
            )  # fmt: skip
            if result is None:  # another process's share, gathered by the main process
                continue
            role = "conjugate" if name in self.conjugates else "target" if name in self.targets else "retained"
            faults.point("eval")
            self.store.add_result(self.run_id, arm, stage, role, result)
            console.print(f"  [dim]{arm} stage {stage}[/] {name}: {result.metric} = {result.score:.3f}")
        if together:
            distributed.barrier()  # every result is in the store before any process reads it again


def stage_records(cfg: ExperimentConfig, stage: StageConfig) -> tuple[list[dict], str]:
    """The stage's training records after mixing and replay (deterministic in the experiment's seed)."""
    from ftlab.data.mixing import mix

    faults.point("data")
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
    if context_indicator(stage, arm):
        from ftlab.data.context import add_context_indicator, marked_count

        records = add_context_indicator(records, fmt)
        console.print(f"  context indicator on {marked_count(records)} of {len(records)} records")
    job = StageJob(
        model=model, tokenizer=tokenizer, records=records, fmt=fmt, method=arm.method,
        train=train_config(cfg, stage, arm), work_dir=work, stage=t - 1, settings=trainer_settings(stage, arm),
        max_length=stage.max_length, masked_thought=masked_thought_settings(stage, arm), resume=True,
        load_base=lambda: load_model(cfg.base, settings=cfg.load)[0], seed=cfg.seed,
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
        done = store.stage_done(run_id, arm.name, t) and output_kind(model_dir) is not None
        needs_model = not done or ev.missing(arm.name, t, conjugate=t == n) or (t == n and arm.post)
        needs_model = needs_model or (t == n and needs_explanation(cfg, store, run_id, arm.name))
        needs_model = needs_model or (t == n and keep_pending(cfg, arm, out))
        next_needs = t < n and not store.stage_done(run_id, arm.name, t + 1)
        if done:
            if needs_model or next_needs:
                model, tokenizer = load_model(model_dir, settings=cfg.load)
            else:
                model = None
        else:
            if model is None:
                prev = cfg.base if t == 1 else stage_model_dir(out, arm.name, t - 1, n)
                model, tokenizer = load_model(prev, settings=cfg.load)
            console.print(f"[bold]{arm.name}[/]: training stage {t} ({stage.name}, {arm_trainer(stage, arm)})")
            work = arm_dir(out, arm.name) / f"stage-{t}.work"
            try:
                result = train_stage(model, tokenizer, cfg, stage, arm, t, work)
            except faults.NonFiniteLoss as err:  # the stage stops; the last good checkpoint stays in `work`
                err.where = f"arm {arm.name} stage {t}"
                store.fail_stage(run_id, arm.name, t, stage.name, str(err), steps=err.step)
                raise
            saved: dict[str, Any] = {}
            if ranks.is_main_process:  # before final_model(): an adapter is saved before LoRA is merged
                start = cfg.base if t == 1 else stage_model_dir(out, arm.name, t - 1, n)
                auto = (arm.save or cfg.save) == "auto"
                saved = save_output(result, tokenizer, model_dir, save_mode(cfg, arm), start, auto=auto)
            model = result.final_model()
            store.finish_stage(
                run_id, arm.name, t, stage.name,
                train_seconds=result.train_seconds, trainable_params=result.trainable_params,
                optimizer_state_bytes=result.optimizer_state_bytes, steps=result.steps,
                model_path=str(model_dir), info={**result.plan_info, **saved},
            )  # fmt: skip
            if ranks.is_main_process:  # only now: a kill before the row is in resumes from the last checkpoint
                shutil.rmtree(work, ignore_errors=True)
            ranks.wait_for_everyone()
        if model is not None:
            ev.run(model, tokenizer, arm.name, t, conjugate=t == n)
    store.add_artifact(run_id, arm.name, "model", str(stage_model_dir(out, arm.name, n, n)))
    if model is not None and ranks.is_main_process and needs_explanation(cfg, store, run_id, arm.name):
        explain(cfg, arm, store, run_id, ev, model, tokenizer, out)
    if arm.post and model is not None and ranks.is_main_process:
        run_sweep(cfg, arm, store, run_id, ev, model, tokenizer, stage_model_dir(out, arm.name, n, n))
    if model is not None and ranks.is_main_process and keep_pending(cfg, arm, out):  # `keep:` (ftlab.budget)
        from ftlab.budget_models import run_experiment_budget

        console.print(f"[bold]{arm.name}[/]: forgetting budget {arm_keep(cfg, arm):g}")
        run_experiment_budget(cfg, arm_keep(cfg, arm), store, run_id, arm.name, ev, model, tokenizer,
                              arm_dir(out, arm.name), log=console.print)  # fmt: skip
    ranks.wait_for_everyone()


def keep_pending(cfg: ExperimentConfig, arm: ArmConfig, out: Path) -> bool:
    """Whether the arm has a forgetting budget (``keep``) whose search has not run yet."""
    from ftlab.budget_models import budget_pending

    return arm_keep(cfg, arm) is not None and budget_pending(arm_dir(out, arm.name))


def save_output(result: Any, tokenizer: Any, folder: Path, mode: str, start: Any, auto: bool = False) -> dict:
    """Save a trained stage at ``folder`` as ``mode`` says (``experiment.save_mode``); returns ``{"output": kind,
    "output_bytes": n}`` for the stage's info.

    ``adapter``: the PEFT adapter folder (``adapter_config.json`` records ``start``, the model this stage began
    from, as its base). ``diff``: the tensors that changed against ``start`` (``ftlab.diffs``); with ``auto`` a diff
    larger than ``AUTO_MAX_FRACTION`` of the model is saved as a whole model instead. ``model``: the whole model,
    LoRA merged. Call it before ``result.final_model()`` (which merges LoRA in place).
    """
    from ftlab import diffs

    kind = mode
    if mode == "adapter" and hasattr(result.model, "peft_config"):
        for peft_cfg in result.model.peft_config.values():
            peft_cfg.base_model_name_or_path = diffs.portable_ref(start)
        save_model(result.model, tokenizer, folder)
    elif mode == "diff":
        final = result.final_model()
        reader = diffs.open_reader(start)
        tuned_sd = final.state_dict()
        tensors = diffs.compute_diff(reader, tuned_sd)
        if auto and diffs.tensor_bytes(tensors[0]) > diffs.AUTO_MAX_FRACTION * diffs.tensor_bytes(tuned_sd):
            kind = "model"
            save_model(final, tokenizer, folder)
        else:
            diffs.save_diff(reader, final, folder, base_ref=start, tokenizer=tokenizer, tensors=tensors)
        del reader
    else:
        kind = "model"
        save_model(result.final_model(), tokenizer, folder)
    return {"output": kind, "output_bytes": diffs.folder_bytes(folder)}


def needs_explanation(cfg: ExperimentConfig, store: Store, run_id: str, arm: str) -> bool:
    """Whether the arm's per-item TuCo (``eval.explain``) is still to compute."""
    from ftlab.analysis.explain import has_tuco

    return cfg.eval.explain > 0 and not has_tuco(store, run_id, arm)


def explain(
    cfg: ExperimentConfig, arm: ArmConfig, store: Store, run_id: str, ev: Evaluator, model: Any, tokenizer: Any,
    out: Path,
) -> None:  # fmt: skip
    """TuCo of each retained suite's ``eval.explain`` worst-forgotten items of the arm (``ftlab.analysis.explain``)."""
    from ftlab.analysis.explain import explain_arm

    suites = [ev.suites[name] for name in ev.retained]
    base_model = load_model(cfg.base, settings=cfg.load)[0].to(model.device)
    explain_arm(
        store, run_id, arm.name, len(cfg.stages), [s.name for s in suites], cfg.eval.explain, base_model, model,
        tokenizer, arm_dir(out, arm.name), {s.name: s.higher_is_better for s in suites},
    )  # fmt: skip
    del base_model


def run_sweep(
    cfg: ExperimentConfig,
    arm: ArmConfig,
    store: Store,
    run_id: str,
    ev: Evaluator,
    model: Any,
    tokenizer: Any,
    model_dir: Path | None = None,
) -> None:
    """Score each repair point of an arm's final model; weight edits are applied in place and undone after.

    The edits come from ``ftlab.edits.EDITS``. A weight edit streams over the base's and the arm's saved
    checkpoints (``model_dir``) shard by shard into a temporary folder and is loaded into the tuned model tensor by
    tensor (``ftlab.edits.stream``), so the sweep holds one copy of the tuned weights to restore, not fp32 copies
    of base, tuned and edited models; when either is not a safetensors checkpoint (an embedded test model, a sparse
    diff) the edit runs in memory on fp32 state dicts. A decode-time composite is built over the base and tuned
    models and scored as a model.
    """
    from ftlab.edits import EDITS, apply_edit
    from ftlab.edits.stream import load_weights_into, open_checkpoint, stream_edit

    n = len(cfg.stages)
    points = [p for p in sweep_points(arm) if ev.missing(p[0], n)]
    if not points:
        return
    sources = None
    weight_edits = [EDITS[e] for _, e, _ in points if not EDITS[e].composite]
    if model_dir is not None and weight_edits and all(e.prepare is not None for e in weight_edits):
        sources = [open_checkpoint(cfg.base), open_checkpoint(model_dir, cfg.base)]
        sources = sources if all(s is not None for s in sources) else None
    need_base = sources is None or any(EDITS[e].composite for _, e, _ in points)
    base_model = load_model(cfg.base, settings=cfg.load)[0] if need_base else None
    base_sd = state_dict_fp32(base_model) if sources is None else None
    tuned_sd = state_dict_fp32(model) if sources is None else {k: v.detach().to("cpu", copy=True)
                                                                for k, v in model.state_dict().items()}  # fmt: skip
    for name, edit, settings in points:
        store.add_arm(run_id, name, "edit", edit, arm.name, {"edit": edit, "settings": settings})
        console.print(f"[bold]{name}[/]: repair point")
        if EDITS[edit].composite:
            ev.run(EDITS[edit].apply(base_model, model, **settings), tokenizer, name, n, split=False)
            continue
        if sources is None:
            model.load_state_dict(apply_edit(edit, base_sd, tuned_sd, **settings), strict=False)
        else:
            work = model_dir.parent / f".{model_dir.name}.sweep"
            stream_edit(edit, sources[0], sources[1:], work, **settings)
            load_weights_into(model, work)
            shutil.rmtree(work, ignore_errors=True)
        faults.point("sweep")
        ev.run(model, tokenizer, name, n, split=False)
    model.load_state_dict(tuned_sd, strict=False)
    del base_model


def process_state() -> Any:
    """Accelerate's view of the processes of this run: one, or several under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    from ftlab.train.trainer_args import cpu_process_group

    return PartialState(cpu=cpu_process_group())


def run_experiment(cfg: ExperimentConfig, store: Store | None = None, suites: dict | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the summary that is also written to ``<out>/summary.json``.

    Args:
        cfg: a validated experiment config.
        store: the store to write (default: ``Store()``, i.e. ``$FTLAB_STORE`` or ``~/.local/share/ftlab``).
        suites: what ``preflight(cfg)`` returned, when the caller ran it before opening the store; None runs it
            here, before the output folder or any store row is written.

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

    # reads every suite, every stage's data and the base reference first: bad input fails before anything is written
    suites = preflight(cfg) if suites is None else suites
    ev = Evaluator(cfg, store, run_id, enabled=ranks.is_main_process, suites=suites)
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
        remove_temps(out)  # temporaries of atomic writes a killed process left behind
        previous = marker.read_text().strip() if marker.is_file() else None
        if previous and previous != run_id:
            clear_other_runs_work(store, out, previous, config)
        store.start_run(run_id, cfg.name, str(out.resolve()), config, cfg.seed, git_sha(), versions())
        write_text(marker, run_id + "\n")
    ranks.wait_for_everyone()
    console.print(f"run [bold]{run_id}[/] -> {out}  (store {store.path})")
    store.add_arm(run_id, "base", "base", "none", None, {"model": cfg.base})
    if ev.missing("base", 0, conjugate=True):  # every process: evaluation is split across them
        base, tok = load_model(cfg.base, settings=cfg.load)
        if ranks.is_main_process:
            console.print("[bold]base[/]: evaluating once for every arm")
        ev.run(base, tok, "base", 0, conjugate=True)
        del base
    for arm in cfg.arms:
        run_arm(cfg, arm, store, run_id, ev, out)  # ends at a barrier, so every store write is in
    summary = build_summary(store, run_id)
    if ranks.is_main_process:
        write_json(out / "summary.json", summary)
        faults.point("summary")
        store.finish_run(run_id)
        log_to_trackers(cfg, summary, out)
    return summary


def clear_other_runs_work(store: Store, out: Path, previous: str, config: dict[str, Any]) -> None:
    """The output folder held another run (``previous``): drop its unfinished stages' work folders, so no stage of
    this run resumes from another config's checkpoint. One exception: the previous run stopped on a NaN loss and
    differs from this one only in learning rates; then a stage it stopped keeps its last good checkpoint, and
    resumes from it with the new rate (``ftlab.train.sft.scale_lr_after_failure``)."""
    import json

    from ftlab.train.sft import FAILURE_FILE

    old = store.run(previous)
    same = (
        old is not None
        and old["status"] == "failed"
        and _without_lr(json.loads(old["config"])) == _without_lr(json.loads(json.dumps(config, default=str)))
    )
    for work in (out / "arms").glob("*/stage-*.work"):
        if not (same and (work / FAILURE_FILE).is_file()):
            shutil.rmtree(work, ignore_errors=True)


def _without_lr(obj: Any) -> Any:
    """A config mapping with every ``lr`` key left out (at any depth)."""
    if isinstance(obj, dict):
        return {k: _without_lr(v) for k, v in obj.items() if k != "lr"}
    if isinstance(obj, list):
        return [_without_lr(v) for v in obj]
    return obj


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
