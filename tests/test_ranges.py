"""Numeric settings are range-checked when the config is read: one line naming the field, nothing written."""

import pytest
from test_top_floor import tiny_experiment
from typer.testing import CliRunner

from ftlab.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=-5", "train.max_steps: -5 is neither -1"),
        ("train.max_steps=0", "train.max_steps: 0 is neither -1"),
        ("train.lr=0", "train.lr: must be > 0"),
        ("train.batch_size=0", "train.batch_size: 0 is below its minimum 1"),
        ("train.grad_accum=0", "train.grad_accum: 0 is below its minimum 1"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 is not in [0, 1)"),
        ("train.scheduler=bogus", "train.scheduler: 'bogus' is not one of"),
        ("train.save_steps=-1", "train.save_steps: -1 is below its minimum 0"),
        ("eval.batch_size=0", "eval.batch_size: 0 is below its minimum 1"),
        ("eval.limit=0", "eval.limit: 0 is below its minimum 1"),
        ("eval.confidence=1.0", "eval.confidence: 1.0 is not in [0.5, 1)"),
        ("stages=[{data: x.jsonl, max_length: 0}]", "stages.stage1.max_length: 0 is below its minimum 1"),
        ("stages=[{data: x.jsonl, replay: {y.jsonl: 1.5}}]", "stages.stage1.replay.y.jsonl: 1.5 is not a number in"),
        ("stages=[{data: x.jsonl, mix: {y.jsonl: -1}}]", "stages.stage1.mix.y.jsonl: -1 is not a number >= 0"),
    ],
)
def test_run_refuses_out_of_range_settings_before_writing(tmp_path, override, message):
    exp = tiny_experiment(tmp_path, "  - {name: f, method: {name: full}}")
    store = tmp_path / "s.db"
    done = runner.invoke(app, ["run", str(exp), "--store", str(store), "--set", override])
    assert done.exit_code == 2, done.output
    assert message in done.output and done.output.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and not store.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_length=0", "data.max_length: 0 is below its minimum 1"),
        ("data.limit=0", "data.limit: 0 is below its minimum 1"),
        ("data.validation=1.5", "data.validation: the fraction 1.5 is not in (0, 1)"),
        ("train.max_steps=0", "train.max_steps: 0 is neither -1"),
    ],
)
def test_train_refuses_out_of_range_settings(tmp_path, tiny_config, override, message):
    import yaml

    from ftlab.config import to_dict

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_config)))
    done = runner.invoke(app, ["train", str(cfg), "--set", override])
    assert done.exit_code == 2 and message in done.output, done.output
    assert not (tmp_path / "out").exists()
