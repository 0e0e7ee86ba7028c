"""Several processes: evaluation split across ranks equals one process's, only rank 0 writes the store; the
accelerate pass-through (config checks, the relaunch command, launcher detection)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from _util import write_jsonl

from ftlab.config import ConfigError
from ftlab.distributed import LAUNCHED_ENV, launched, relaunch_command, shard_bounds

EXAMPLES = Path(__file__).parent.parent / "examples" / "accelerate"
TEXT = "The river runs to the sea.\nBoats sail on the sea every day.\nThe sea is wide.\nBirds fly.\nRain falls.\n"


def test_shards_cover_the_items_in_order():
    for n in (0, 1, 5, 7, 8):
        for world in (1, 2, 3):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            got = [i for start, stop in parts for i in range(start, stop)]
            assert got == list(range(n))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def _experiment(tmp: Path):
    from ftlab.recipes.experiment import EvalSettings, ExperimentConfig, StageConfig

    qa = [{"prompt": f"Capital of Land{i}?", "answer": f"City{i}"} for i in range(5)]
    target = write_jsonl(tmp / "qa.jsonl", qa)
    text = write_jsonl(tmp / "text.jsonl", [{"text": line} for line in TEXT.splitlines()])
    return ExperimentConfig(
        base="tiny-test", out=str(tmp / "out"), stages=[StageConfig(name="s", data="x", targets=[str(target)])],
        retained=[str(text)], eval=EvalSettings(batch_size=2, max_new_tokens={str(target): 4}),
    )  # fmt: skip


def _worker(rank: int, tmp: str, port: int) -> None:
    """One of two gloo processes: the Evaluator scores the tiny model on a generation and a perplexity suite (rank 0
    writes the store), then ``evaluate(split=True)`` runs once more and rank 0 dumps its rows in order."""
    import dataclasses
    import json

    import torch
    import torch.distributed as dist

    from ftlab.evals.runner import evaluate
    from ftlab.models import tiny_model, tiny_tokenizer
    from ftlab.recipes.run import Evaluator
    from ftlab.store import Store

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        store = Store(Path(tmp) / "split.db", read_only=rank != 0)
        ev = Evaluator(_experiment(Path(tmp)), store, "r", enabled=rank == 0)
        model = tiny_model(seed=1).eval()
        ev.run(model, tiny_tokenizer(), "base", 0)
        dumped = {}
        for ref, suite in ev.suites.items():
            got = evaluate(model, tiny_tokenizer(), suite, batch_size=2, max_new_tokens=4, split=True)
            assert (got is None) == (rank != 0)
            if got is not None:
                dumped[ref] = {"score": got.score, "rows": [dataclasses.asdict(r) for r in got.items]}
        if rank == 0:
            (Path(tmp) / "rows.json").write_text(json.dumps(dumped))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_evaluation_equals_one_process(tmp_path):
    """Two gloo processes each score a share of every suite; rank 0 gathers and writes; the rows and scores equal a
    one-process evaluation, item for item and in order, and are stored once."""
    import json

    import torch.multiprocessing as mp

    from ftlab.evals.runner import evaluate
    from ftlab.models import tiny_model, tiny_tokenizer
    from ftlab.recipes.run import Evaluator
    from ftlab.store import Store

    split = Store(tmp_path / "split.db")  # made before the workers open it (rank 1 opens it read-only)
    split.start_run("r", "x", str(tmp_path), {}, 0, "", {})
    # fork: the workers share this process's imports (spawning two fresh interpreters costs ~20 s of imports here)
    mp.start_processes(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True, start_method="fork")
    dumped = json.loads((tmp_path / "rows.json").read_text())
    ev = Evaluator(_experiment(tmp_path), Store(tmp_path / "unused.db"), "r")
    model = tiny_model(seed=1).eval()
    for ref, suite in ev.suites.items():
        single = evaluate(model, tiny_tokenizer(), suite, batch_size=2, max_new_tokens=4, progress=False)
        rows = [(r.item_id, r.output, r.score) for r in single.items]
        assert len(rows) == 5
        assert [(r["item_id"], r["output"]) for r in dumped[ref]["rows"]] == [(i, o) for i, o, _ in rows]
        assert [r["score"] for r in dumped[ref]["rows"]] == pytest.approx([s for _, _, s in rows], rel=1e-6)
        assert dumped[ref]["score"] == pytest.approx(single.score, rel=1e-6)
        stored = split.items("r", "base", 0, suite.name)
        assert sorted((r["item_id"], r["output"]) for r in stored) == sorted((i, o) for i, o, _ in rows)
        (result,) = [r for r in split.results("r", "base") if r["suite"] == suite.name]
        assert result["n"] == 5 and result["score"] == pytest.approx(single.score, rel=1e-6)
    assert split.count("results", "r") == 2  # each suite written once, by rank 0


# ---------------------------------------------------------------- accelerate pass-through
def test_accelerate_key_is_checked(tmp_path):
    from ftlab.recipes.experiment import check_accelerate

    assert check_accelerate(None) is None
    with pytest.raises(ConfigError, match=r"accelerate: .*nope.yaml is not a file"):
        check_accelerate(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: [FSDP\n")
    with pytest.raises(ConfigError, match=r"accelerate: .*bad.yaml line \d+: not valid YAML"):
        check_accelerate(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("num_processes: 2\n")
    with pytest.raises(ConfigError, match="field 'distributed_type' is missing"):
        check_accelerate(str(empty))
    for example in ("fsdp.yaml", "deepspeed_zero2.yaml"):
        assert check_accelerate(str(EXAMPLES / example))["distributed_type"] in ("FSDP", "DEEPSPEED")


def test_experiment_validation_names_the_accelerate_field(tmp_path):
    from ftlab.recipes.experiment import load_experiment

    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"base: tiny-test\nout: {tmp_path / 'o'}\naccelerate: {tmp_path / 'missing.yaml'}\n"
        "stages: [{name: a, data: fictional-capitals}]\narms: [{name: full, method: {name: full}}]\n"
    )
    with pytest.raises(ConfigError, match=r"exp.yaml: accelerate: .*missing.yaml is not a file"):
        load_experiment(exp)


def test_relaunch_command_and_launcher_detection():
    cmd = relaunch_command("cfg/fsdp.yaml", ["run", "exp.yaml", "--set", "seed=1"])
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "cfg/fsdp.yaml", "-m", "ftlab",
                   "run", "exp.yaml", "--set", "seed=1"]  # fmt: skip
    assert not launched({})
    assert launched({"LOCAL_RANK": "0"})  # torchrun / accelerate launch with several processes
    assert launched({"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch with one process
    assert launched({LAUNCHED_ENV: "1"})  # an ftlab relaunch never relaunches again


def test_run_relaunches_under_accelerate_once(tmp_path, monkeypatch):
    """`ftlab run` with `accelerate:` hands the same arguments to `accelerate launch` (and exits with its code);
    inside a launched process it runs the experiment instead."""
    from typer.testing import CliRunner

    import ftlab.distributed as distributed
    from ftlab.cli import app

    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"base: tiny-test\nout: {tmp_path / 'o'}\naccelerate: {EXAMPLES / 'fsdp.yaml'}\n"
        "stages: [{name: a, data: fictional-capitals}]\narms: [{name: full, method: {name: full}}]\n"
    )
    calls = []
    monkeypatch.setattr(distributed, "relaunch", lambda config, args: calls.append((config, list(args))) or 3)
    for name in (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    got = CliRunner().invoke(app, ["run", str(exp), "--set", "seed=2", "--store", str(tmp_path / "s.db")])
    assert got.exit_code == 3, got.output
    assert calls == [(str(EXAMPLES / "fsdp.yaml"), ["run", str(exp), "--set", "seed=2", "--store",
                                                    str(tmp_path / "s.db")])]  # fmt: skip
    ran = []
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    monkeypatch.setattr("ftlab.recipes.run.preflight", lambda cfg: None)
    monkeypatch.setattr("ftlab.recipes.run.run_experiment", lambda cfg, store, **kw: ran.append(cfg) or {"arms": {}})
    monkeypatch.setattr("ftlab.cli.train.print_table", lambda summary: None)
    got = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "s.db")])
    assert got.exit_code == 0, got.output
    assert len(ran) == 1 and len(calls) == 1
    assert os.environ[LAUNCHED_ENV] == "1"


def test_example_configs_become_accelerate_launch_settings():
    """accelerate's own launcher reads each example: FSDP2 turns into the FSDP_* variables its Accelerator reads, the
    DeepSpeed one into a ZeRO-2 launch; both run `-m ftlab run ...` in every process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    for name, fsdp in (("fsdp.yaml", True), ("deepspeed_zero2.yaml", False)):
        cmd = relaunch_command(str(EXAMPLES / name), ["run", "exp.yaml"])
        args = launch_command_parser().parse_args(cmd[3:])
        args, _, _ = _validate_launch_command(args)
        assert (args.use_fsdp, args.use_deepspeed) == (fsdp, not fsdp)
        assert args.module and args.training_script == "ftlab" and args.training_script_args == ["run", "exp.yaml"]
        if fsdp:
            env = prepare_multi_gpu_env(args)
            assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        else:
            assert args.zero_stage == 2
