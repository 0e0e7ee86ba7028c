"""Bad stores, data files and output paths: one line, exit code 2, and the file the user pointed at left untouched."""

import sqlite3

import pytest
from test_top_floor import tiny_experiment
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.store import SCHEMA_VERSION, Store

runner = CliRunner()


def _stores(tmp_path):
    folder = tmp_path / "folder.db"
    folder.mkdir()
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n")
    truncated = tmp_path / "cut.db"
    Store(tmp_path / "good.db")
    truncated.write_bytes((tmp_path / "good.db").read_bytes()[:120])
    newer = tmp_path / "newer.db"  # a store written by a later ftlab (plain journal, so its bytes are final)
    con = sqlite3.connect(newer)
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY)")
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.close()
    return {
        "folder": (folder, "is a folder"),
        "text": (text, "not an SQLite file"),
        "truncated": (truncated, "not a readable ftlab store"),
        "newer": (newer, "newer than this ftlab's"),
        "foreign": (foreign, "not an ftlab store"),
    }


@pytest.mark.parametrize("kind", ["folder", "text", "truncated", "newer", "foreign"])
def test_a_bad_store_is_one_line_and_left_untouched(tmp_path, kind):
    path, message = _stores(tmp_path)[kind]
    before = None if path.is_dir() else path.read_bytes()
    exp = tiny_experiment(tmp_path, "  - {name: f, method: {name: full}}")
    for args in (["runs", "--store", str(path)], ["run", str(exp), "--store", str(path)]):
        done = runner.invoke(app, args)
        assert done.exit_code == 2, (args, done.output)
        assert message in done.output and done.output.strip().count("\n") == 0 and "Traceback" not in done.output
    assert before is None or path.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_non_utf8_jsonl_names_file_and_line(tmp_path, tiny_config):
    import dataclasses

    import yaml

    from ftlab.config import to_dict

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train=str(bad)))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    done = runner.invoke(app, ["train", str(path)])
    assert done.exit_code == 2 and f"{bad}:2: not UTF-8 text" in done.output, done.output


def test_out_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    exp = tiny_experiment(tmp_path, "  - {name: f, method: {name: full}}")
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    done = runner.invoke(app, ["run", str(exp), "--out", str(target), "--store", str(tmp_path / "s.db")])
    assert done.exit_code == 2 and "is a file" in done.output, done.output
    assert target.read_text() == "keep me" and not (tmp_path / "s.db").exists()
