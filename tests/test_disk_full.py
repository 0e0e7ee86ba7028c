"""A full disk while writing a checkpoint, a model, a file or the store: one line naming the path (exit code 2), the
previous checkpoint / file / rows left exactly as they were, and no half-written folder under a final name.

The disk is filled by test doubles of the writers (safetensors' ``save_file`` as transformers calls it, a file
writer, SQLite's page limit): each writes part of its output, then fails with ``ENOSPC`` as a full disk would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from _util import write_jsonl
from typer.testing import CliRunner

from ftlab.atomic import DiskFullError, replace_dir, write_text
from ftlab.cli import app
from ftlab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def experiment(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows[:4]])
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: full-disk\nbase: tiny-test\nout: {tmp_path / 'out'}\n"
        "train: {lr: 0.003, max_steps: 6, batch_size: 4, save_steps: 2, logging_steps: 2}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}\n"
        "retained: []\narms:\n  - {name: full, method: {name: full}}\neval: {batch_size: 8}\n"
    )
    return path


def fill_disk_when(monkeypatch, should_fail) -> list:
    """transformers' safetensors writer fails with ENOSPC half-way through a file whose path ``should_fail(path)``
    (after writing half its bytes); returns the list of paths it failed on."""
    import transformers.modeling_utils as mu
    from safetensors.torch import save

    real = mu.safe_save_file
    failed = []

    def save_file(tensors, filename, metadata=None):
        if not should_fail(str(filename)):
            return real(tensors, filename, metadata=metadata)
        data = save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        failed.append(str(filename))
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(mu, "safe_save_file", save_file)
    return failed


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def error_line(output: str) -> str:
    assert "Traceback" not in output and output.count("error:") == 1, output
    line = "error:" + output.split("error:")[-1].rstrip()  # (a progress bar may share its line)
    assert "\n" not in line
    return line


def store_intact(db: Path) -> list:
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        same = "i.run_id=r.run_id AND i.arm=r.arm AND i.stage=r.stage AND i.suite=r.suite"
        count = f"SELECT COUNT(*) FROM items i WHERE {same}"
        return con.execute(f"SELECT arm, stage, suite, n, ({count}) FROM results r").fetchall()


def test_full_disk_in_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    exp, db = experiment(tmp_path), tmp_path / "s.db"
    work = tmp_path / "out" / "arms" / "full" / "stage-1.work"
    before = {}
    failed = fill_disk_when(
        monkeypatch, lambda p: "checkpoint-4" in p and not before.update(digest(work / "checkpoint-2"))
    )
    done = runner.invoke(app, ["run", str(exp), "--store", str(db)])
    assert done.exit_code == 2 and failed, done.output
    assert error_line(done.output) == (
        f"error: disk full while writing {work / 'checkpoint-4'}: No space left on device; free some space and rerun"
    )
    assert not (work / "checkpoint-4").exists()  # no half checkpoint under its final name
    assert digest(work / "checkpoint-2") == before  # the previous checkpoint, byte for byte
    assert json.loads((work / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert load_file(work / "checkpoint-2" / "model.safetensors")  # loadable
    rows = store_intact(db)
    assert rows and all(n == items for *_, n, items in rows)  # the base's results, each with all its items
    assert Store(db).runs()[0]["status"] == "running"

    monkeypatch.undo()  # space again: the rerun resumes from checkpoint-2 and finishes
    again = runner.invoke(app, ["run", str(exp), "--store", str(db)])
    assert again.exit_code == 0, again.output
    assert [(s["status"], s["steps"]) for s in Store(db).stages(Store(db).runs()[0]["run_id"])] == [("done", 6)]


def test_full_disk_while_saving_the_model_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    exp, db = experiment(tmp_path), tmp_path / "s.db"
    arm = tmp_path / "out" / "arms" / "full"
    failed = fill_disk_when(monkeypatch, lambda p: ".model.tmp-" in p)
    done = runner.invoke(app, ["run", str(exp), "--store", str(db)])
    assert done.exit_code == 2 and failed, done.output
    assert error_line(done.output).startswith(f"error: disk full while writing {arm / 'model'}: No space left")
    assert sorted(p.name for p in arm.iterdir()) == ["stage-1.work"]  # no model folder, no temporary
    assert (arm / "stage-1.work" / "checkpoint-6" / "trainer_state.json").is_file()
    rows = store_intact(db)
    assert rows and all(n == items for *_, n, items in rows)
    monkeypatch.undo()
    assert runner.invoke(app, ["run", str(exp), "--store", str(db)]).exit_code == 0
    assert (arm / "model" / "model.safetensors").is_file() and not (arm / "stage-1.work").exists()


def test_full_disk_in_atomic_writes_leaves_the_previous_version(tmp_path):
    target = write_text(tmp_path / "summary.json", "old\n")

    def fill(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    from ftlab.atomic import write_with

    with pytest.raises(DiskFullError, match=f"^disk full while writing {target}: No space left on device"):
        write_with(target, fill)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    folder = tmp_path / "model"
    with replace_dir(folder) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(DiskFullError, match=f"^disk full while writing {folder}: "), replace_dir(folder) as tmp:
        (tmp / "a.txt").write_text("v2")
        fill(str(tmp / "b.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "summary.json"]
    assert [p.name for p in folder.iterdir()] == ["a.txt"] and (folder / "a.txt").read_text() == "v1"


def test_full_disk_in_the_store_rolls_back_and_says_so(tmp_path, monkeypatch):
    db = tmp_path / "s.db"
    store = Store(db)
    store.start_run("r", "x", "o", {}, 0, "", {})

    def result(suite: str, n: int) -> SimpleNamespace:
        items = [
            SimpleNamespace(item_id=str(i), prompt="p" * 2000, output="o", reference="r", score=1.0) for i in range(n)
        ]
        return SimpleNamespace(
            suite=suite, metric="acc", score=1.0, n=n, stderr=0.0, higher_is_better=True, items=items
        )

    store.add_result("r", "base", 0, "target", result("small", 3))
    connect = Store._connect

    def full(self):  # the file may not grow by a single page: a full disk, as SQLite reports it
        con = connect(self)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={pages}")
        return con

    monkeypatch.setattr(Store, "_connect", full)
    with pytest.raises(DiskFullError, match=f"^disk full while writing {db}: database or disk is full"):
        store.add_result("r", "base", 0, "target", result("big", 200))
    monkeypatch.undo()
    assert store_intact(db) == [("base", 0, "small", 3, 3)]  # the failed result left nothing, the old one is whole
    done = runner.invoke(app, ["runs", "--store", str(db)])
    assert done.exit_code == 0 and "r" in done.output
