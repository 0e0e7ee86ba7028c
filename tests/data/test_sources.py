"""Training data from any `datasets` source: files, folders, load_from_disk, hub names; column mapping; validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from _util import write_jsonl
from datasets import Dataset, DatasetDict
from typer.testing import CliRunner

from ftlab.config import ConfigError
from ftlab.data import DataError, check_columns
from ftlab.data.sources import hold_out, load_train_data, resolve_train_data

runner = CliRunner()
QA = [{"question": f"Capital of Land{i}?", "answer": f"City{i}", "id": i} for i in range(16)]
MAP = {"prompt": "question", "completion": "answer"}


def write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_table(path: Path, rows: list[dict]) -> Path:
    """``rows`` as the file kind ``path``'s suffix names (a folder without a suffix: ``save_to_disk``)."""
    data = Dataset.from_list(rows)
    if path.suffix in (".csv", ".tsv"):
        return write_csv(path, rows, "\t" if path.suffix == ".tsv" else ",")
    if path.suffix == ".parquet":
        data.to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".arrow":
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, data.data.table.schema) as writer:
            writer.write_table(data.data.table)
    else:
        data.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["qa.csv", "qa.tsv", "qa.parquet", "qa.arrow", "qa.json", "saved", "qa.jsonl"])
def test_every_source_maps_columns_and_names_rows(tmp_path, name):
    path = write_jsonl(tmp_path / name, QA) if name.endswith(".jsonl") else write_table(tmp_path / name, QA)
    records, fmt = load_train_data(str(path), columns=MAP)
    assert fmt == "completion" and len(records) == 16
    assert (records[6]["prompt"], records[6]["completion"]) == ("Capital of Land6?", "City6")
    assert records[6]["_where"] == (f"{path}:7" if name.endswith(".jsonl") else f"{path}:row 7")


def test_splits_of_folders_and_saved_dicts(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_csv(folder / "train.csv", QA[:12])
    write_csv(folder / "test.csv", QA[12:])
    test, _ = load_train_data(str(folder), split="test", columns=MAP)
    assert [r["completion"] for r in test] == ["City12", "City13", "City14", "City15"]
    saved = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(QA[:12]), "valid": Dataset.from_list(QA[12:])}).save_to_disk(str(saved))
    assert [r["prompt"] for r in load_train_data(str(saved), split="valid", columns=MAP)[0]][0] == "Capital of Land12?"
    assert len(load_train_data(str(saved), split="train[:50%]", columns=MAP)[0]) == 6
    with pytest.raises(DataError, match=r"dict: split 'test'.*train, valid"):
        load_train_data(str(saved), split="test", columns=MAP)
    with pytest.raises(DataError, match=r"qa.jsonl: has no split 'test'"):
        load_train_data(str(write_jsonl(tmp_path / "qa.jsonl", QA)), split="test")


def test_chat_column_with_role_and_content_keys(tmp_path):
    rows = [
        {"conversations": [{"from": "user", "value": f"hi {i}"}, {"from": "assistant", "value": f"yo {i}"}]}
        for i in range(8)
    ]
    path = write_table(tmp_path / "chat.parquet", rows)
    cols = {"messages": "conversations", "role": "from", "content": "value"}
    records, fmt = load_train_data(str(path), columns=cols)
    assert fmt == "chat" and records[2]["messages"] == [
        {"role": "user", "content": "hi 2"},
        {"role": "assistant", "content": "yo 2"},
    ]
    rows[4]["conversations"][0]["from"] = "human"
    write_table(path, rows)
    with pytest.raises(DataError, match=r"chat.parquet:row 5: field 'messages\[0\].role' \(column 'conversations'\)"):
        load_train_data(str(path), columns=cols)


def test_bad_cells_name_file_row_and_column(tmp_path):
    rows = [{k: str(v) for k, v in r.items()} for r in QA[:8]]
    rows[6]["answer"] = ""
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"bad.csv:row 7: field 'completion' \(column 'answer'\) is empty"):
        load_train_data(str(path), columns=MAP)
    with pytest.raises(DataError, match=r"bad.csv: no column 'questoin' \(columns.prompt\); its columns: question"):
        load_train_data(str(path), columns={"prompt": "questoin", "completion": "answer"})
    with pytest.raises(DataError, match=r"bad.csv:row 1: missing field 'completion'.*its columns: question, answer"):
        load_train_data(str(path), fmt="completion", columns={"prompt": "question"})
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [*QA[:6], {"question": "q", "answer": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl:7: field 'completion' \(column 'answer'\) must be a string"):
        load_train_data(str(jsonl), columns=MAP)
    with pytest.raises(ConfigError, match=r"data.columns.question: not a record field"):
        check_columns({"question": "prompt"}, "data.columns")


def test_hub_names_go_to_load_dataset_and_offline_misses_say_so(monkeypatch):
    with pytest.raises(DataError, match=r"^nobody/nothing: .*not in the local cache") as err:
        resolve_train_data("nobody/nothing")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"missing.parquet: no such file"):
        resolve_train_data("missing.parquet")  # a file name is never looked up on the hub
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or Dataset.from_list(QA))
    records, _ = load_train_data("someone/qa", split="validation", columns=MAP)
    assert calls == [(("someone/qa",), {"split": "validation"})]
    assert (records[1]["prompt"], records[1]["_where"]) == ("Capital of Land1?", "someone/qa:row 2")
    assert len(load_train_data("fictional-capitals")[0]) == 48 and calls[1:] == []  # built-ins stay local


def test_hold_out_is_seeded_and_checked(tmp_path):
    records = [{"prompt": str(i), "completion": "x"} for i in range(20)]
    train, held = hold_out(records, 0.25, seed=3, fmt="completion")
    assert len(held) == 5 and len(train) == 15 and {r["prompt"] for r in train + held} == {str(i) for i in range(20)}
    assert hold_out(records, 0.25, seed=3, fmt="completion") == (train, held)
    assert hold_out(records, 0.25, seed=4, fmt="completion")[1] != held
    for bad in (0.0, 1.0, 0.99):
        with pytest.raises(ConfigError, match="data.validation"):
            hold_out(records, bad, seed=0, fmt="completion")
    path = write_csv(tmp_path / "val.csv", QA[:3])
    assert hold_out(records, str(path), 0, "completion", MAP) == (records, load_train_data(str(path), columns=MAP)[0])


def run_cli(tmp_path: Path, data: dict, steps: int = 4) -> tuple:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": "tiny-test",
                "data": {"max_length": 128, **data},
                "train": {"lr": 1e-3, "max_steps": steps, "batch_size": 4, "logging_steps": 2},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    from ftlab.cli import app

    return runner.invoke(app, ["train", str(cfg)]), tmp_path / "out"


@pytest.mark.parametrize("name", ["qa.parquet", "qa.csv"])
def test_table_with_other_column_names_trains_tiny_model(tmp_path, monkeypatch, name):
    import ftlab.recipes.train as train_mod

    seen = []
    original = train_mod.sft_dataset
    monkeypatch.setattr(train_mod, "sft_dataset", lambda records, *a: seen.append(records) or original(records, *a))
    path = write_table(tmp_path / name, QA)
    result, out = run_cli(tmp_path, {"train": str(path), "columns": MAP})
    assert result.exit_code == 0, result.output
    assert "trained 4 steps" in result.output and (out / "model" / "model.safetensors").exists()
    assert (seen[0][3]["prompt"], seen[0][3]["completion"]) == ("Capital of Land3?", "City3")  # what trained
    assert json.loads((out / "train_log.json").read_text())["train_records"] == 16


def test_bad_column_exits_2_naming_file_and_column(tmp_path):
    path = write_table(tmp_path / "qa.parquet", QA)
    result, out = run_cli(tmp_path, {"train": str(path), "columns": {"prompt": "questoin", "completion": "answer"}})
    assert result.exit_code == 2
    assert "qa.parquet" in result.output and "questoin" in result.output
    assert not out.exists()
    result, _ = run_cli(tmp_path, {"train": str(path), "columns": {"query": "question"}})
    assert result.exit_code == 2 and "data.columns.query" in result.output


def test_validation_fraction_logs_eval_loss(tmp_path):
    path = write_table(tmp_path / "qa.csv", QA)
    result, out = run_cli(tmp_path, {"train": str(path), "columns": MAP, "validation": 0.25})
    assert result.exit_code == 0, result.output
    log = json.loads((out / "train_log.json").read_text())
    assert (log["train_records"], log["eval_records"]) == (12, 4)
    evals = [row for row in log["log_history"] if "eval_loss" in row]
    assert [row["step"] for row in evals] == [2, 4]  # every logging step


def test_experiment_stage_takes_split_and_columns(tmp_path):
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import stage_records

    saved = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(QA[:12]), "test": Dataset.from_list(QA[12:])}).save_to_disk(str(saved))
    exp = tmp_path / "exp.yaml"
    stage = {"name": "qa", "data": str(saved), "split": "test", "columns": MAP}
    exp.write_text(json.dumps({"base": "tiny-test", "stages": [stage], "arms": [{"name": "full"}]}))
    cfg = load_experiment(exp)
    records, fmt = stage_records(cfg, cfg.stages[0])
    assert fmt == "completion" and [r["completion"] for r in records] == ["City12", "City13", "City14", "City15"]
    assert records[0]["prompt"] == "Capital of Land12?"
    with pytest.raises(ConfigError, match=r"stages\[0\].columns.query"):
        load_experiment(exp, ["stages=[{name: qa, data: x.jsonl, columns: {query: q}}]"])
