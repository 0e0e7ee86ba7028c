"""Trackers (``train.report_to``): the trainer's logs and ftlab's scores and retention land in the same tracker runs,
read back from tensorboard event files and MLflow's local file store; nothing is written when it is unset."""

from pathlib import Path

import pytest
from test_top_floor import runner, tiny_experiment

from ftlab.cli import app
from ftlab.config import ConfigError, TrainConfig
from ftlab.recipes.experiment import load_experiment
from ftlab.recipes.run import run_experiment
from ftlab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = "  - {name: full, method: {name: full}, post: {scale: [0.5]}}"
TEXT = "text"  # a perplexity suite: every weight change shows, so the arm's score differs from the base's


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """MLflow's local file store under tmp_path (nothing reaches a server), in a named experiment; the working folder
    is tmp_path, so a log written to a default place (``./runs``, ``./mlruns``, ``./mlflow.db``) would show."""
    uri = f"file:{tmp_path / 'tracking'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database unless told
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ftlab-test")
    monkeypatch.chdir(tmp_path)
    return uri


def experiment(tmp_path: Path, *overrides: str):
    (tmp_path / "text.txt").write_text("The river runs to the sea. Boats sail on the sea every day.\n" * 4)
    exp = tiny_experiment(tmp_path, ARMS, retained=str(tmp_path / "text.txt"))
    return load_experiment(exp, ["train.logging_steps=1", *overrides])


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(uri: str) -> dict[str, object]:
    """Run name -> run, in the test's experiment (each name once)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ftlab-test").experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), names
    return {r.info.run_name: r for r in runs}


def test_run_logs_training_and_its_figures_to_the_same_tensorboard_and_mlflow_runs(tmp_path, mlflow_uri):
    cfg = experiment(tmp_path, "train.report_to=[tensorboard, mlflow]")
    s = run_experiment(cfg, Store(tmp_path / "s.db"))
    arm, point, base = s["arms"]["full"], s["arms"]["full+scale=0.5"], s["base"]
    assert arm["stages"][0][TEXT] != pytest.approx(base[TEXT])  # the checks below can tell the arm from the base
    tb = tmp_path / "out" / "tb"

    # tensorboard: the stage's folder holds the trainer's loss and the arm's scores and retention
    stage = scalars(tb / "full" / "stage-1")
    assert [step for step, _ in stage["train/loss"]] == [1, 2]
    for suite, score in arm["stages"][0].items():
        assert stage[f"eval/{suite}"] == [(1, pytest.approx(score, rel=1e-6))]
    assert stage["retention"] == [(1, pytest.approx(arm["retention"], rel=1e-6))]
    assert stage[f"retained/{TEXT}"] == [(1, pytest.approx(arm["retained"][TEXT], rel=1e-6))]
    assert scalars(tb / "base") == {f"eval/{k}": [(0, pytest.approx(v, rel=1e-6))] for k, v in base.items()}
    assert scalars(tb / "full+scale=0.5")[f"eval/{TEXT}"] == [(1, pytest.approx(point["stages"][0][TEXT], rel=1e-6))]

    # MLflow: one run per trained stage, holding the training log and ftlab's figures; the base and the repair
    # point get runs of their own
    runs = mlflow_runs(mlflow_uri)
    assert set(runs) == {"out/full/stage-1", "out/base", "out/full+scale=0.5"}
    metrics = runs["out/full/stage-1"].data.metrics
    assert "loss" in metrics and "train_loss" in metrics
    assert metrics[f"eval/{TEXT}"] == pytest.approx(arm["stages"][0][TEXT])
    assert metrics["retention"] == pytest.approx(arm["retention"])
    assert metrics["target_gain"] == pytest.approx(arm["target_gain"])
    assert runs["out/base"].data.metrics == pytest.approx({f"eval/{k}": v for k, v in base.items()})
    assert runs["out/full+scale=0.5"].data.metrics["retention"] == pytest.approx(point["retention"])

    # only where it was told: no default log folders, nothing left under the removed work folders
    assert not any((tmp_path / name).exists() for name in ("runs", "mlruns", "mlflow.db"))
    assert not (tmp_path / "out" / "arms" / "full" / "stage-1.work").exists()

    # resuming the finished run logs the same figures again into the same runs: no new run, no second event file
    run_experiment(cfg, Store(tmp_path / "s.db"))
    assert set(mlflow_runs(mlflow_uri)) == set(runs)
    assert len(list((tb / "base").glob("events.out.tfevents.*"))) == 1


def test_without_report_to_nothing_is_written(tmp_path, mlflow_uri):
    from ftlab.train.trainer_args import base_trainer_kwargs

    assert base_trainer_kwargs(TrainConfig(), tmp_path / "w")["report_to"] == "none"
    run_experiment(experiment(tmp_path), Store(tmp_path / "s.db"))
    assert not (tmp_path / "out" / "tb").exists()
    assert not any((tmp_path / name).exists() for name in ("tracking", "mlruns", "runs", "mlflow.db"))


def test_an_unknown_or_missing_tracker_is_a_config_error_before_anything_is_written(tmp_path, monkeypatch):
    exp = tiny_experiment(tmp_path, ARMS)
    with pytest.raises(ConfigError, match=r"train\.report_to: 'neptune' is not a tracker"):
        load_experiment(exp, ["train.report_to=[tensorboard, neptune]"])
    result = runner.invoke(app, ["run", str(exp), "--store", str(tmp_path / "s.db"), "--set", "train.report_to=[x]"])
    assert result.exit_code == 2 and "train.report_to" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("ftlab.config.installed", lambda module: module != "wandb")
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb is not installed \(pip install wandb\)"):
        load_experiment(exp, ["arms=[{name: a, method: {name: full}, train: {report_to: [wandb]}}]"])


def test_ftlab_train_logs_under_the_output_folder(tmp_path, tiny_config, mlflow_uri):
    from ftlab.recipes.train import run_train

    tiny_config.train.report_to = ["tensorboard", "mlflow"]
    out, _ = run_train(tiny_config)
    assert [step for step, _ in scalars(out / "tb")["train/loss"]] == [2, 4]
    assert "loss" in mlflow_runs(mlflow_uri)[out.name].data.metrics


def test_tracker_runs_are_placed_by_the_work_folder(tmp_path):
    from ftlab.trackers import trainer_location

    train = TrainConfig(report_to=["tensorboard"])
    work = tmp_path / "exp" / "arms" / "lora" / "stage-2.work"
    assert trainer_location(train, work) == ("exp/lora/stage-2", tmp_path / "exp" / "tb" / "lora" / "stage-2")
    assert trainer_location(train, work / "phase") is None  # a method's inner phase reports nowhere
    named = TrainConfig(report_to=["tensorboard"], run_name="v2", logging_dir=str(tmp_path / "logs"))
    assert trainer_location(named, work) == ("v2/lora/stage-2", tmp_path / "logs" / "lora" / "stage-2")
    assert trainer_location(named, tmp_path / "o" / "work") == ("v2", tmp_path / "logs")
