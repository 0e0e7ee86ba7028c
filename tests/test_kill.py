"""Kill anywhere: `ftlab run` killed with SIGKILL inside every phase, or at random moments, resumes to the same result.

The experiment is small (the tiny model, 8 records, one stage, arms ``full`` with a two-point repair sweep and
``lora``, a target and a retained suite, a checkpoint every 2 of 6 steps). Each `ftlab run` is a real process that is
really killed; to keep the many restarts cheap, the processes are forked from a *zygote* that imported ftlab, torch
and transformers once (``ZYGOTE`` below), and each child runs the command line (``ftlab.cli.app``) on its own
arguments. A kill inside a phase comes from ``FTLAB_KILL_AT=<phase>:<n>`` (``ftlab.faults``); a random kill is a
SIGKILL after a seeded random delay.

After the last restart completes, the run must equal an uninterrupted one: the same summary figures, the same final
weights (within float tolerance), the same store rows (no duplicates, none half-written: each result has exactly its
items), and no leftover temporaries, work folders or checkpoints in the output folder.

By default a reduced phase chain (one kill per phase, 10 kills) and 2 random-kill seeds run; ``FTLAB_KILLS=30`` (or the
``slow`` test) adds that many random-kill seeds, each in its own output folder, restarted until done.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _util import close_summaries as _close
from _util import write_jsonl

ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import ftlab.cli, ftlab.recipes.run, ftlab.train.sft, ftlab.evals, ftlab.report.html, ftlab.methods.lora  # noqa
from ftlab.cli import app
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.pop("FTLAB_KILL_AT", None)
        os.environ.update(job["env"])
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            app(job["argv"], prog_name="ftlab")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        if job.get("code"):
            with open(job["code"] + ".tmp", "w") as fh:
                fh.write(str(code))
            os.replace(job["code"] + ".tmp", job["code"])
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    if job.get("wait", True):
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""

# The phase chain: each restart of the same run is killed at the next point (phase:n counts passages within one
# process), ordered so that every point still lies ahead of what the run has finished.
PHASE_CHAIN = [
    ("write:1", True),  # the run marker, mid atomic write
    ("store:2", True),  # inside the second store transaction (an arm row), before its commit
    ("eval:2", True),  # the base's second suite scored, not yet stored
    ("data:1", True),  # full: reading the stage's records
    ("train:3", True),  # full: after optimizer step 3 (checkpoint-2 on disk)
    ("checkpoint:1", True),  # full: inside writing checkpoint-4 (no trainer state yet)
    ("save:1", True),  # full: the final model folder filled, not yet renamed into place
    ("store:3", False),  # full: inside the finished stage's transaction
    ("eval:1", False),  # full: its first suite scored, not stored
    ("sweep:2", True),  # full: the second repair point's weights loaded, not yet scored
    ("train:2", False),  # lora: after optimizer step 2
    ("checkpoint:2", False),  # lora: inside writing checkpoint-4
    ("summary:1", True),  # summary.json written, the run not yet marked done
]  # (point, in the default reduced chain); FTLAB_KILLS=N runs all of them
REPORT_KILL = "write:2"  # `ftlab report`: inside writing its second file (a plot or the page)
TABLES = ("runs", "arms", "stages", "results", "items", "artifacts")


def make_experiment(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Capital of Aland{i}?", "completion": f"Ax{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows])
    (tmp_path / "text.txt").write_text("The river runs to the sea. The sea is wide and blue. Boats sail on it.\n" * 3)
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: kill\nbase: tiny-test\nout: {tmp_path / 'unused'}\n"
        "train: {lr: 0.003, max_steps: 6, batch_size: 4, save_steps: 2, logging_steps: 2}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}\n"
        f"retained: [{tmp_path / 'text.txt'}]\n"
        "arms:\n  - {name: full, method: {name: full}, post: {scale: [0.0, 0.5]}}\n"
        "  - {name: lora, method: {name: lora, params: {r: 4}}, train: {lr: 0.01}}\n"
        "eval: {batch_size: 8}\n"
    )
    return path


class Zygote:
    """A process that imported ftlab once and forks one child per command (``run(argv, env, kill_after)``)."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["FTLAB_PROGRESS"] = "0"
        env.pop("FTLAB_KILL_AT", None)
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, argv: list[str], env: dict | None = None, kill_after: float | None = None) -> int:
        """Run ``ftlab ARGV`` in a forked child; SIGKILL it after ``kill_after`` seconds when given; its exit code
        (negative for a signal)."""
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        started = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = json.loads(self.proc.stdout.readline())["status"]
        self.seconds = time.perf_counter() - started  # how long the child ran
        return status

    def start(self, argv: list[str], log: Path, env: dict | None = None) -> Path:
        """Start ``ftlab ARGV`` in a forked child without waiting; its exit code appears in the returned file when it
        ends (output goes to ``log``)."""
        code = Path(f"{log}.code")
        job = {"argv": argv, "env": env or {}, "log": str(log), "wait": False, "code": str(code)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        json.loads(self.proc.stdout.readline())
        return code

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The experiment, a zygote, and the uninterrupted reference run (its summary, weights, store rows, files)."""
    tmp = tmp_path_factory.mktemp("kill")
    exp = make_experiment(tmp)
    zygote = Zygote(tmp / "log.txt")
    ref = tmp / "ref"
    code = zygote.run(run_args(exp, ref))
    seconds = zygote.seconds
    assert code == 0, (tmp / "log.txt").read_text()[-3000:]
    yield {"tmp": tmp, "exp": exp, "zygote": zygote, "ref": snapshot(ref), "seconds": seconds}
    zygote.close()


def run_args(exp: Path, out: Path) -> list[str]:
    return ["run", str(exp), "--out", str(out), "--store", str(out.parent / f"{out.name}.db")]


def snapshot(out: Path) -> dict:
    """What must not differ between an interrupted and an uninterrupted run."""
    from safetensors.torch import load_file

    summary = json.loads((out / "summary.json").read_text())
    weights = {p.relative_to(out).as_posix(): load_file(p) for p in sorted(out.glob("arms/*/model/*.safetensors"))}
    con = sqlite3.connect(out.parent / f"{out.name}.db")
    con.row_factory = sqlite3.Row
    rows = {t: [dict(r) for r in con.execute(f"SELECT * FROM {t}")] for t in TABLES}
    # no half-written rows: every result has exactly its n items, every stage is done with its model saved
    per_result = {
        (r["arm"], r["stage"], r["suite"]): r["n"] for r in con.execute("SELECT arm, stage, suite, n FROM results")
    }
    items = {
        (r[0], r[1], r[2]): r[3]
        for r in con.execute("SELECT arm, stage, suite, COUNT(*) FROM items GROUP BY arm, stage, suite")
    }
    con.close()
    assert per_result == items
    assert all(r["status"] == "done" and r["steps"] == 6 and r["error"] is None for r in rows["stages"])
    assert [r["status"] for r in rows["runs"]] == ["done"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_dir())
    return {"summary": summary, "weights": weights, "rows": rows, "files": files}


def same_run(got: dict, ref: dict) -> None:
    """``got`` equals the uninterrupted ``ref``: figures, weights (float tolerance), store rows, files."""
    import torch

    _close(strip(got["summary"]), strip(ref["summary"]))
    assert got["weights"].keys() == ref["weights"].keys() and got["weights"]
    for name, tensors in ref["weights"].items():
        assert tensors.keys() == got["weights"][name].keys()
        for key, value in tensors.items():
            torch.testing.assert_close(got["weights"][name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    for table in TABLES:
        assert len(got["rows"][table]) == len(ref["rows"][table]), table  # nothing duplicated, nothing missing
    key = lambda r: (r["arm"], r["stage"], r["suite"])  # noqa: E731
    for a, b in zip(sorted(got["rows"]["results"], key=key), sorted(ref["rows"]["results"], key=key), strict=True):
        assert key(a) == key(b) and a["n"] == b["n"] and a["score"] == pytest.approx(b["score"], rel=1e-6, abs=1e-9)
    item = lambda r: (r["arm"], r["stage"], r["suite"], r["item_id"], r["output"], r["score"])  # noqa: E731
    assert sorted(map(item, got["rows"]["items"])) == sorted(map(item, ref["rows"]["items"]))
    # no temporaries, work folders or half checkpoints a reader could take for outputs
    assert got["files"] == ref["files"], set(got["files"]) ^ set(ref["files"])


def strip(summary: dict) -> dict:
    """The figures only: the run id, times and paths differ between output folders."""
    return {
        "base": summary["base"],
        "arms": {
            name: {k: v for k, v in arm.items() if k != "train_seconds"} for name, arm in summary["arms"].items()
        },
    }


def test_a_kill_inside_every_phase_resumes_to_the_uninterrupted_result(world):
    zygote, exp = world["zygote"], world["exp"]
    out = world["tmp"] / "chain"
    landed = []
    full = bool(os.environ.get("FTLAB_KILLS"))
    for spec in [spec for spec, default in PHASE_CHAIN if default or full]:
        code = zygote.run(run_args(exp, out), {"FTLAB_KILL_AT": spec})
        assert code == -signal.SIGKILL, f"{spec}: the run ended ({code}) before the kill point; {world['tmp']}/log.txt"
        landed.append(spec)
        if spec == "checkpoint:1":  # the cut checkpoint is on disk, without its trainer state
            cut = out / "arms" / "full" / "stage-1.work" / "checkpoint-4"
            assert cut.is_dir() and not (cut / "trainer_state.json").exists()
        if spec == "save:1":
            assert not (out / "arms" / "full" / "model").exists()  # never a half model under the final name
    assert zygote.run(run_args(exp, out)) == 0, (world["tmp"] / "log.txt").read_text()[-3000:]
    # `ftlab report`, killed while writing its files, then again
    report = ["report", str(out), "--store", str(out.parent / "chain.db"), "--out", str(out / "report.html")]
    assert zygote.run(report, {"FTLAB_KILL_AT": REPORT_KILL}) == -signal.SIGKILL
    landed.append(f"report {REPORT_KILL}")
    assert zygote.run(report) == 0 and "</html>" in (out / "report.html").read_text()
    # starting the finished run again changes nothing and sweeps the temporaries the killed report left
    assert zygote.run(run_args(exp, out)) == 0
    (out / "report.html").unlink()
    for png in out.glob("report_*.png"):
        png.unlink()
    same_run(snapshot(out), world["ref"])
    print(f"kill points tried: {len(landed)}; restarts equal to the uninterrupted run: 1 of 1 ({landed})")


def random_kills(world, seed: int, max_kills: int = 3) -> int:
    """Kill a fresh run at seeded random moments (at most ``max_kills`` times), then let it finish; returns the
    kills that landed."""
    rng = random.Random(seed)
    out = world["tmp"] / f"seed{seed}"
    landed = 0
    for _ in range(max_kills):
        code = world["zygote"].run(run_args(world["exp"], out), kill_after=rng.uniform(0.1, 0.9 * world["seconds"]))
        if code == 0:
            break
        assert code == -signal.SIGKILL, (world["tmp"] / "log.txt").read_text()[-3000:]
        landed += 1
    else:
        assert world["zygote"].run(run_args(world["exp"], out)) == 0, (world["tmp"] / "log.txt").read_text()[-3000:]
    same_run(snapshot(out), world["ref"])
    return landed


def test_random_kills_resume_to_the_uninterrupted_result(world):
    seeds = int(os.environ.get("FTLAB_KILLS", "0")) or 2
    landed = [random_kills(world, seed, max_kills=3 if seeds > 2 else 1) for seed in range(seeds)]
    print(f"random seeds: {seeds}; kills landed: {sum(landed)}; restarts equal to the uninterrupted run: {seeds}")
    assert sum(landed) >= 1


@pytest.mark.slow
def test_thirty_random_kill_seeds(world):
    landed = [random_kills(world, 1000 + seed) for seed in range(30)]
    print(f"30 seeds, kills landed: {sum(landed)}; all 30 restarts equal to the uninterrupted run")
    assert sum(landed) >= 20
