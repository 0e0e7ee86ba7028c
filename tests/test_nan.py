"""A NaN loss stops the stage at that step with one line, keeps the last good checkpoint, records the failure in the
store, and a rerun with a lower ``train.lr`` resumes from that checkpoint at the new rate."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from _util import write_jsonl
from typer.testing import CliRunner

from ftlab.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TOO_HIGH = 0.05  # the stand-in for "this learning rate diverges": above it, the loss becomes NaN from step 4 on


def experiment(tmp_path):
    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows[:4]])
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: nan\nbase: tiny-test\nout: {tmp_path / 'out'}\n"
        "train: {lr: 0.1, max_steps: 6, batch_size: 4, save_steps: 2, logging_steps: 2, scheduler: constant}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}\n"
        "retained: []\narms:\n  - {name: full, method: {name: full}}\neval: {batch_size: 8}\n"
    )
    return path


@pytest.fixture
def diverging(monkeypatch):
    """SFT's loss becomes NaN from step 4 on while the learning rate is above TOO_HIGH; records (step, lr) per step."""
    from trl import SFTTrainer

    seen: list[tuple[int, float]] = []
    real = SFTTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        lr = self.optimizer.param_groups[0]["lr"]
        seen.append((self.state.global_step, lr))
        if lr > TOO_HIGH and self.state.global_step >= 3:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)
    return seen


def test_nan_loss_stops_the_stage_keeps_the_checkpoint_and_resumes_with_a_lower_lr(tmp_path, diverging):
    from safetensors.torch import load_file

    exp, db, out = experiment(tmp_path), tmp_path / "s.db", tmp_path / "out"
    args = ["run", str(exp), "--store", str(db)]
    done = runner.invoke(app, args)
    work = out / "arms" / "full" / "stage-1.work"
    good = work / "checkpoint-2"
    assert done.exit_code == 2, done.output
    assert "Traceback" not in done.output and done.output.count("error:") == 1
    line = "error:" + done.output.split("error:")[-1].rstrip()  # (a progress bar may share its line)
    assert "\n" not in line
    assert line == (
        f"error: arm full stage 1: loss became nan at step 4; last good checkpoint: {good}; "
        "rerun with a lower train.lr"
    )
    # stopped at step 4: steps 1-3 ran, nothing after; the last good checkpoint is whole and nothing newer exists
    assert [step for step, _ in diverging] == [0, 1, 2, 3]
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((good / "trainer_state.json").read_text())["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())
    assert not (out / "arms" / "full" / "model").exists() and not (out / "summary.json").exists()
    # the store says so: a failed stage row and a failed run, each with the message
    with sqlite3.connect(db) as con:
        ((status, error),) = con.execute("SELECT status, error FROM runs").fetchall()
        stages = con.execute("SELECT arm, stage, status, steps, error FROM stages").fetchall()
    assert status == "failed" and error == line.removeprefix("error: ")
    assert stages == [("full", 1, "failed", 4, error)]
    listed = runner.invoke(app, ["runs", "--store", str(db)])
    assert listed.exit_code == 0 and "failed" in listed.output
    with sqlite3.connect(db) as con:
        (failed_id,) = con.execute("SELECT run_id FROM runs").fetchone()
    page = runner.invoke(app, ["report", failed_id, "--store", str(db), "--out", str(tmp_path / "r.html")])
    assert page.exit_code == 0, page.output
    assert "loss became nan at step 4" in (tmp_path / "r.html").read_text()

    # a lower rate: a new run (the rate is part of the run's identity) that resumes the stage from checkpoint-2
    diverging.clear()
    again = runner.invoke(app, [*args, "--set", "train.lr=0.01"])
    assert again.exit_code == 0, again.output
    assert diverging[0][0] == 2, diverging  # resumed after step 2, not from the start
    assert all(lr == pytest.approx(0.01) for _, lr in diverging), diverging  # at the new rate, not the restored one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["full"]["stages"] and not work.exists()
    with sqlite3.connect(db) as con:
        runs = dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        done_row = con.execute("SELECT steps, error FROM stages WHERE run_id=?", (summary["run_id"],)).fetchall()
    assert runs == {"failed": 1, "done": 1} and done_row == [(6, None)]


def test_a_stopped_stage_of_another_config_is_not_resumed(tmp_path, diverging):
    """Only a rerun that changes nothing but learning rates resumes the stopped stage; any other change starts the
    stage afresh (the work folder of the other config is dropped)."""
    exp, db, out = experiment(tmp_path), tmp_path / "s.db", tmp_path / "out"
    assert runner.invoke(app, ["run", str(exp), "--store", str(db)]).exit_code == 2
    diverging.clear()
    other = runner.invoke(app, ["run", str(exp), "--store", str(db), "--set", "train.lr=0.01", "--set", "seed=1"])
    assert other.exit_code == 0, other.output
    assert diverging[0][0] == 0  # from the start
    assert not (out / "arms" / "full" / "stage-1.work").exists()
