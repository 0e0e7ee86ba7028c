"""Two `ftlab run` processes write one store while `ftlab runs` and `ftlab report` poll it: nothing is lost, no reader
ever sees half of a write, and nothing fails with "database is locked"."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from _util import write_jsonl
from test_kill import Zygote, _close, strip

from ftlab.store import Store


def experiment(tmp_path):
    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows])
    (tmp_path / "text.txt").write_text("The river runs to the sea. The sea is wide and blue.\n" * 4)
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: conc\nbase: tiny-test\nout: {tmp_path / 'unused'}\n"
        "train: {lr: 0.003, max_steps: 4, batch_size: 4, save_steps: 2, logging_steps: 2}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}\n"
        f"retained: [{tmp_path / 'text.txt'}]\n"
        "arms:\n  - {name: full, method: {name: full}, post: {scale: [0.5]}}\n"
        "  - {name: lora, method: {name: lora, params: {r: 4}}}\neval: {batch_size: 8}\n"
    )
    return path


def consistent(db) -> dict[str, int]:
    """One read transaction: every stored result has exactly its n items (never half of a write); row counts."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
    try:
        con.execute("BEGIN")
        halves = con.execute(
            "SELECT r.run_id, r.arm, r.suite, r.n, COUNT(i.item_id) FROM results r LEFT JOIN items i ON "
            "i.run_id=r.run_id AND i.arm=r.arm AND i.stage=r.stage AND i.suite=r.suite GROUP BY r.run_id, r.arm, "
            "r.stage, r.suite HAVING r.n != COUNT(i.item_id)"
        ).fetchall()
        assert not halves, halves
        counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "results", "items")}
        con.execute("COMMIT")
        return counts
    finally:
        con.close()


def test_two_runs_and_pollers_on_one_store(tmp_path):
    exp, db = experiment(tmp_path), tmp_path / "shared.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTLAB_PROGRESS": "0"}
    env.pop("FTLAB_KILL_AT", None)
    zygote = Zygote(tmp_path / "poll.log")  # forks the writers and the report polls (ftlab imported once)
    try:
        codes = [
            zygote.start(
                ["run", str(exp), "--out", str(tmp_path / name), "--store", str(db)], tmp_path / f"{name}.log"
            )
            for name in ("one", "two")
        ]
        ftlab = shutil.which("ftlab") or "ftlab"
        polls, reports, last = 0, 0, {"results": 0, "items": 0}
        deadline = time.time() + 240
        while not all(c.exists() for c in codes) and time.time() < deadline:
            if not db.exists():
                time.sleep(0.2)
                continue
            listed = subprocess.run([ftlab, "runs", "--store", str(db)], env=env, capture_output=True, text=True)
            assert listed.returncode == 0 and "locked" not in listed.stdout + listed.stderr, listed.stderr
            polls += 1
            counts = consistent(db)
            assert counts["results"] >= last["results"] and counts["items"] >= last["items"], (counts, last)  # kept
            last = counts
            for run in Store(db).runs():
                code = zygote.run(["report", run["run_id"], "--store", str(db), "--format", "json"])
                assert code == 0, (tmp_path / "poll.log").read_text()[-3000:]
                reports += 1
    finally:
        zygote.close()
    assert "locked" not in (tmp_path / "poll.log").read_text()
    for name, code in zip(("one", "two"), codes, strict=True):
        text = (tmp_path / f"{name}.log").read_text()
        assert code.read_text() == "0" and "locked" not in text, text[-3000:]
    assert polls >= 2 and reports >= 1, (polls, reports)

    # nothing lost: both runs are whole and, being the same experiment, agree on every score
    store = Store(db)
    runs = store.runs()
    assert sorted(r["status"] for r in runs) == ["done", "done"], runs
    per_run = [store.count("results", r["run_id"]) for r in runs]
    assert per_run == [2 + 3 * 2] * 2, per_run  # base + full + lora + full+scale=0.5, each on 2 suites
    consistent(db)
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert one["run_id"] != two["run_id"]
    assert one["base"] == two["base"], (one["base"], two["base"])
    _close(strip(one), strip(two))


def test_old_stores_migrate_and_unusable_ones_stay_untouched(tmp_path):
    """A schema-1 store is migrated in place with its rows; a newer or foreign SQLite file is refused with one line
    and left byte for byte as it was (the refusal itself is in the malformed-input table; this checks the bytes)."""
    from ftlab.store import MIGRATIONS, SCHEMA_VERSION, StoreError

    old = tmp_path / "v1.db"
    con = sqlite3.connect(old)
    con.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    con.execute("INSERT INTO runs (run_id, name, status) VALUES ('r1', 'kept', 'done')")
    con.commit()
    con.close()
    store = Store(old)
    assert store.schema_version == SCHEMA_VERSION == 2
    assert [(r["run_id"], r["name"], r["status"], r["error"]) for r in store.runs()] == [("r1", "kept", "done", None)]

    newer, foreign = tmp_path / "newer.db", tmp_path / "foreign.db"
    for path, statements in ((newer, f"CREATE TABLE runs (x); PRAGMA user_version={SCHEMA_VERSION + 1};"),
                             (foreign, "CREATE TABLE invoices (id INTEGER);")):  # fmt: skip
        con = sqlite3.connect(path)
        con.executescript(statements)
        con.close()
        before = path.read_bytes()
        try:
            Store(path)
        except StoreError as err:
            assert "\n" not in str(err) and "left untouched" in str(err) or "newer than this ftlab" in str(err)
        else:
            raise AssertionError(f"{path} was accepted")
        assert path.read_bytes() == before and not Path(f"{path}-wal").exists()


def test_a_store_mid_checkpoint_is_not_called_cut_short(tmp_path):
    """A checkpoint writes page 1 (the new page count) before the pages after it, so a live WAL store can look cut
    short to a reader for a moment (the poll above once failed that way); without a -wal beside it, a file shorter
    than its header says is refused."""
    from ftlab.store import StoreError, _check_store_file

    db = tmp_path / "s.db"
    Store(db).start_run("r1", "n", "", {}, 0, "", {})
    whole = db.read_bytes()
    db.write_bytes(whole[: len(whole) // 2])  # header claims every page; half the file is there
    try:
        _check_store_file(db)
    except StoreError as err:
        assert "cut short" in str(err)
    else:
        raise AssertionError("a cut-short store without a log was accepted")
    Path(f"{db}-wal").write_bytes(b"")  # a writer's log beside it: mid-checkpoint, SQLite judges the file
    _check_store_file(db)


def _keep_writing(db, stop) -> None:
    store = Store(db)
    i = 0
    while not stop.is_set():
        store.start_run(f"r{i}", "n" * 2000, "", {"x": "y" * 5000}, 0, "", {})  # each write closes: a checkpoint
        i += 1


def test_a_store_under_constant_writes_is_never_refused(tmp_path):
    """The race itself: one process writes (every write ends in a checkpoint) while this one checks the file as every
    ftlab command does on opening. Before the re-read, about 1 check in 160 called the live store cut short."""
    import multiprocessing

    from ftlab.store import StoreError, _check_store_file

    db = tmp_path / "busy.db"
    Store(db)
    stop = multiprocessing.Event()
    writer = multiprocessing.get_context("fork").Process(target=_keep_writing, args=(db, stop))
    writer.start()
    checks, refused = 0, []
    try:
        deadline = time.time() + 3
        while time.time() < deadline:
            checks += 1
            try:
                _check_store_file(db)
            except StoreError as err:
                refused.append(str(err))
    finally:
        stop.set()
        writer.join(10)
    assert Store(db).runs(), "the writer wrote nothing"
    assert not refused, (len(refused), checks, refused[:1])
