"""Experiment trackers: where training logs and ftlab's own figures go when ``train.report_to`` names any of
tensorboard, mlflow, wandb or trackio.

The training logs (loss, learning rate, gradient norm) are the trainer's: transformers' reporting callbacks, given
``report_to`` and a run name by ``ftlab.train.trainer_args``. This module decides where each trainer's tracker run
lives, and once a run's summary exists (``log_summary``) it logs ftlab's evaluation scores and retention figures into
the same tracker runs. One tracker run is one trained stage of one arm; the base and each repair point get a run of
their own. With the prefix ``P`` (``train.run_name``, else the name of the output folder) and the tensorboard root
``<tb>`` (``train.logging_dir``, else ``<out>/tb``):

=================  =====================  ==========================  ================================
what               tracker run name       tensorboard folder          ftlab's figures in it (step)
=================  =====================  ==========================  ================================
arm ``a``, stage t ``P/a/stage-t``        ``<tb>/a/stage-t``          ``eval/<suite>`` (t); the last
                                                                      stage adds ``retention``,
                                                                      ``target_gain``, ``retained/<suite>``
the base           ``P/base``             ``<tb>/base``               ``eval/<suite>`` (0)
repair point ``p`` ``P/p``                ``<tb>/p``                  as an arm's last stage (T)
``ftlab train``    ``train.run_name``,    ``<output>/tb``             (training logs only)
                   else ``<output>``'s
                   name
=================  =====================  ==========================  ================================

How the figures join the training run: tensorboard writes them into the run's folder (their own event file, which a
later call replaces); MLflow logs them into the newest run with the run's name in the experiment
``MLFLOW_EXPERIMENT_NAME`` (else ``MLFLOW_EXPERIMENT_ID``, else the default experiment), creating it when there is
none; trackio resumes the run by name; wandb starts a run with the same name (``job_type`` ``ftlab-eval``) in
``WANDB_PROJECT``. Each library reads its own settings from the environment (``MLFLOW_TRACKING_URI``,
``WANDB_PROJECT``, ``WANDB_MODE``, ``TRACKIO_SPACE_ID``, ...). Every tracker library is imported only when used.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftlab.config import TrainConfig

# tracker name -> (module that must be importable, how to install it)

_STAGE_WORK = re.compile(r"stage-(\d+)\.work")  # `ftlab run` trains stage t of arm a in <out>/arms/<a>/stage-<t>.work
_PHASE = "phase"  # a method's inner training phase trains in <work>/phase; it is not reported
_MLFLOW_KEY = re.compile(r"[^0-9A-Za-z_\-. :/]")


def run_location(train: TrainConfig, out: str | Path, label: str) -> tuple[str, Path]:
    """``(tracker run name, tensorboard folder)`` of the tracker run ``label`` (``<arm>/stage-<t>``, ``base``, a
    repair point) of the ``ftlab run`` whose output folder is ``out``."""
    prefix = train.run_name or Path(out).resolve().name
    root = Path(train.logging_dir) if train.logging_dir else Path(out) / "tb"
    return f"{prefix}/{label}", root / label


def trainer_location(train: TrainConfig, work_dir: str | Path) -> tuple[str, Path] | None:
    """``(tracker run name, tensorboard folder)`` of a trainer whose checkpoint folder is ``work_dir``; None for a
    method's inner training phase, which reports nowhere.

    An ``ftlab run`` stage (``<out>/arms/<a>/stage-<t>.work``) gets its ``run_location``; any other trainer (``ftlab
    train`` trains in ``<output>/work``) is named ``train.run_name`` (else the work folder's parent's name) and writes
    tensorboard logs to ``train.logging_dir`` (else ``tb`` beside the work folder), since the work folder is removed.
    """
    work = Path(work_dir)
    if work.name == _PHASE:
        return None
    stage = _STAGE_WORK.fullmatch(work.name)
    if stage and work.parent.parent.name == "arms":
        return run_location(train, work.parent.parent.parent, f"{work.parent.name}/stage-{stage.group(1)}")
    name = train.run_name or work.resolve().parent.name
    return name, Path(train.logging_dir) if train.logging_dir else work.parent / "tb"


def summary_figures(summary: dict[str, Any]) -> list[tuple[str, str, int, dict[str, float]]]:
    """``(label, arm, step, metrics)`` per tracker run of a ``build_summary`` dict: ``arm`` is whose train settings
    apply (``""`` for the base, the parent arm for a repair point); the step is the stage (0 for the base)."""
    figures = [("base", "", 0, {f"eval/{s}": v for s, v in summary["base"].items()})]
    arms = summary["arms"]
    for name, entry in arms.items():
        trained = entry["kind"] == "train"
        owner = name if trained else entry["parent"]
        n = len(arms[owner]["stages"]) if owner in arms else len(entry["stages"])
        first = n - len(entry["stages"]) + 1
        for t, scores in enumerate(entry["stages"], start=first):
            metrics = {f"eval/{s}": v for s, v in scores.items()}
            if t == n:
                metrics["retention"] = entry["retention"]
                metrics["target_gain"] = entry["target_gain"]
                metrics.update({f"retained/{s}": r for s, r in entry["retained"].items()})
            label = f"{name}/stage-{t}" if trained else name
            figures.append((label, owner, t, {k: float(v) for k, v in metrics.items() if v is not None}))
    return figures


def log_summary(summary: dict[str, Any], out: str | Path, config_of: Callable[[str, int], TrainConfig]) -> list[str]:
    """Log a run's evaluation scores and retention figures to the trackers of each tracker run.

    Args:
        summary: a ``build_summary`` dict.
        out: the run's output folder.
        config_of: ``(arm, stage) -> TrainConfig`` whose ``report_to``, ``run_name`` and ``logging_dir`` apply to
            that arm's stage (arm ``""``: the base, stage 0).

    Returns:
        The trackers written to.
    """
    used: dict[str, None] = {}
    for label, arm, step, metrics in summary_figures(summary):
        train = config_of(arm, step)
        if not metrics or not train.report_to:
            continue
        name, folder = run_location(train, out, label)
        for tracker in dict.fromkeys(train.report_to):
            LOGGERS[tracker](name, folder, step, metrics)
            used[tracker] = None
    return list(used)


def log_tensorboard(name: str, folder: Path, step: int, metrics: dict[str, float]) -> None:
    """Scalars into the run's folder, in an event file of ftlab's own that replaces the one a previous call wrote."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*.ftlab"):
        old.unlink()
    writer = SummaryWriter(log_dir=str(folder), filename_suffix=".ftlab")
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    writer.close()


def log_mlflow(name: str, folder: Path, step: int, metrics: dict[str, float]) -> None:
    """Metrics into the newest MLflow run named ``name`` (created, and ended, when there is none)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # MLFLOW_TRACKING_URI, as transformers' callback reads it
    experiment = _mlflow_experiment(client)
    quote = '"' if "'" in name else "'"
    found = client.search_runs(
        [experiment], f"attributes.run_name = {quote}{name}{quote}", order_by=["attributes.start_time DESC"],
        max_results=1,
    )  # fmt: skip
    run_id = found[0].info.run_id if found else client.create_run(experiment, run_name=name).info.run_id
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(_MLFLOW_KEY.sub("_", k), v, stamp, step) for k, v in metrics.items()])
    if not found:
        client.set_terminated(run_id)


def _mlflow_experiment(client: Any) -> str:
    """The experiment transformers' MLflow callback logs to: ``MLFLOW_EXPERIMENT_NAME`` (created when missing), else
    ``MLFLOW_EXPERIMENT_ID``, else the default experiment."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"


def log_wandb(name: str, folder: Path, step: int, metrics: dict[str, float]) -> None:
    """A wandb run with the training run's name (wandb joins runs by id, not name) in ``WANDB_PROJECT``."""
    import wandb

    if wandb.run is not None:  # transformers' callback leaves its last run open
        wandb.finish()
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=name, job_type="ftlab-eval")
    run.log(metrics, step=step)
    run.finish()


def log_trackio(name: str, folder: Path, step: int, metrics: dict[str, float]) -> None:
    """Metrics into the trackio run of that name (resumed), in transformers' default project."""
    import trackio

    trackio.init(project="huggingface", name=name, resume="allow")
    trackio.log(metrics)
    trackio.finish()


LOGGERS: dict[str, Callable[[str, Path, int, dict[str, float]], None]] = {
    "tensorboard": log_tensorboard,
    "mlflow": log_mlflow,
    "wandb": log_wandb,
    "trackio": log_trackio,
}
