"""Every malformed input is one clear error before anything is written.

One table of malformed inputs (data files, suites, YAML configs, command-line arguments, model folders and numeric
ranges). Each case builds its files in a fresh folder, runs the real command line in-process, and checks the
contract of ``ftlab.cli.common.clean_errors``:

- exit code 2, no traceback;
- exactly one ``error:`` line, the last line of the output, naming the file (and line or row where the input has
  lines) and the field;
- nothing written: every file under the case's folder is unchanged (same names, sizes and modification times), so
  no output folder, no store file and no store row appear, and a bad store the case points at is left as it was.

Cases run on the tiny model (``tiny-test``) or fail before any model loads, so the whole table takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftlab.cli import app

runner = CliRunner()

GOOD = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(6)]
GOOD_LINES = "".join(json.dumps(r) + "\n" for r in GOOD)
QA = "".join(json.dumps({"prompt": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(4))


@dataclass
class Env:
    """The case's folder and the files every case can point at."""

    root: Path
    model: Path  # a saved tiny model folder (safetensors), shared by the cases that need a good folder

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def store(self) -> Path:
        return self.root / "s.db"


Build = Callable[[Env], list[str]]


@dataclass
class Case:
    id: str
    build: Build  # writes the case's files, returns the command-line arguments
    says: list[str] = field(default_factory=list)  # substrings of the error line ({root} is the case's folder)


# ------------------------------------------------------------------ builders
def train_config(env: Env, source: str | None = None, **sections: dict) -> Path:
    """A valid ``ftlab train`` config on the tiny model, with ``data.train`` and sections overridden."""
    cfg = {
        "model": "tiny-test",
        "data": {"train": source or str(env.file("train.jsonl", GOOD_LINES)), "max_length": 128},
        "method": {"name": "full"},
        "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 2},
        "output": {"dir": str(env.out)},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = env.root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_data(name: str, content: str | bytes, **data: object) -> Build:
    """``ftlab train`` whose ``data.train`` is a file with ``content`` (``data`` overrides other data keys)."""

    def build(env: Env) -> list[str]:
        path = env.file(name, content) if content is not None else env.root / name
        return ["train", str(train_config(env, str(path), data=data))]

    return build


def train_table(name: str, write: Callable[[Path], None], **data: object) -> Build:
    """``ftlab train`` whose ``data.train`` is a table file written by ``write(path)``."""

    def build(env: Env) -> list[str]:
        path = env.root / name
        write(path)
        return ["train", str(train_config(env, str(path), data=data))]

    return build


def train_set(*overrides: str) -> Build:
    def build(env: Env) -> list[str]:
        args = ["train", str(train_config(env))]
        for item in overrides:
            args += ["--set", item.format(root=env.root) if "{root}" in item else item]
        return args

    return build


def experiment(env: Env, arms: str = "  - {name: f, method: {name: full}}", stages: str = "", extra: str = "") -> Path:
    """A one-stage experiment on the tiny model (the YAML of ``test_top_floor.tiny_experiment``)."""
    env.file("a.jsonl", GOOD_LINES)
    env.file("a_test.jsonl", QA)
    stages = stages or f"  - {{name: a, data: {env.root / 'a.jsonl'}, targets: [{env.root / 'a_test.jsonl'}]}}"
    return env.file(
        "exp.yaml",
        f"name: t\nbase: tiny-test\nout: {env.out}\n"
        "train: {lr: 0.003, max_steps: 2, batch_size: 4, save_steps: 0}\n"
        f"stages:\n{stages}\nretained: []\narms:\n{arms}\neval: {{batch_size: 8}}\n{extra}",
    )


def run_set(*overrides: str, **exp: str) -> Build:
    """``ftlab run`` of the tiny experiment (``exp`` replaces its arms/stages/extra YAML) with ``--set`` items."""

    def build(env: Env) -> list[str]:
        args = ["run", str(experiment(env, **exp)), "--store", str(env.store)]
        for item in overrides:
            args += ["--set", item.format(root=env.root) if "{root}" in item else item]
        return args

    return build


def run_args(*extra: str, files: dict[str, str | bytes] | None = None) -> Build:
    """``ftlab run`` of the tiny experiment with more arguments (``{root}`` expands) after writing ``files``."""

    def build(env: Env) -> list[str]:
        for name, content in (files or {}).items():
            env.file(name, content)
        exp = experiment(env)
        return ["run", str(exp), "--store", str(env.store), *(a.format(root=env.root) for a in extra)]

    return build


def run_files(files: dict[str, str | bytes], stages: str = "", extra: str = "", arms: str = "") -> Build:
    """``ftlab run`` of the tiny experiment after writing ``files`` ({root} in ``stages``/``extra`` expands)."""

    def build(env: Env) -> list[str]:
        for name, content in files.items():
            env.file(name, content)
        kw = {"stages": stages.format(root=env.root), "extra": extra.format(root=env.root)}
        if arms:
            kw["arms"] = arms
        return ["run", str(experiment(env, **kw)), "--store", str(env.store)]

    return build


def config_text(command: str, text: str | bytes) -> Build:
    """``ftlab train|run`` of a config file holding ``text``."""

    def build(env: Env) -> list[str]:
        path = env.file("cfg.yaml", text)
        return [command, str(path)] + (["--store", str(env.store)] if command == "run" else [])

    return build


def cli(*args: str, files: dict[str, str | bytes] | None = None) -> Build:
    """Any command line; ``{root}``, ``{model}``, ``{out}``, ``{store}`` expand; ``files`` are written first."""

    def build(env: Env) -> list[str]:
        for name, content in (files or {}).items():
            env.file(name, content)
        names = {"root": env.root, "model": env.model, "out": env.out, "store": env.store}
        return [a.format(**names) for a in args]

    return build


def model_folder(make: Callable[[Env, Path], None]) -> Build:
    """``ftlab eval --model FOLDER`` on a small suite, where ``make(env, folder)`` builds the folder."""

    def build(env: Env) -> list[str]:
        folder = env.root / "m"
        folder.mkdir()
        make(env, folder)
        suite = env.file("qa.jsonl", QA)
        return ["eval", "--model", str(folder), "--suite", str(suite)]

    return build


def copy_model(env: Env, folder: Path, skip: tuple[str, ...] = ()) -> None:
    for f in env.model.iterdir():
        if f.name not in skip:
            (folder / f.name).write_bytes(f.read_bytes())


def edit_config(env: Env, folder: Path, **changes: object) -> None:
    copy_model(env, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def corrupt_safetensors(env: Env, folder: Path) -> None:
    copy_model(env, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


def adapter_without_base(env: Env, folder: Path) -> None:
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(env.root / "gone-base"), "r": 2})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)


def bad_store(kind: str, command: str) -> Build:
    """``ftlab run`` (of the tiny experiment) or ``ftlab runs`` on a store path that is not a usable ftlab store."""

    def build(env: Env) -> list[str]:
        import sqlite3

        from ftlab.store import SCHEMA_VERSION, Store

        path = env.root / "bad.db"
        if kind == "folder":
            path.mkdir()
        elif kind == "text":
            path.write_text("these are my notes, not a database\n")
        elif kind == "truncated":
            good = env.root / "elsewhere" / "good.db"
            good.parent.mkdir()
            Store(good)
            path.write_bytes(good.read_bytes()[:120])
        else:
            con = sqlite3.connect(path)  # plain journal, so its bytes are final when it is closed
            if kind == "newer":
                con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY)")
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
            else:
                con.execute("CREATE TABLE invoices (id INTEGER)")
            con.commit()
            con.close()
        if command == "runs":
            return ["runs", "--store", str(path)]
        return ["run", str(experiment(env)), "--store", str(path)]

    return build


STORE_MESSAGES = {
    "folder": "is a folder",
    "text": "not an SQLite file",
    "truncated": "not a readable ftlab store",
    "newer": "newer than this ftlab's",
    "foreign": "not an ftlab store",
}


def parquet(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)

    return write


def text(content: str | bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content if isinstance(content, bytes) else content.encode())


# ------------------------------------------------------------------ the table
BAD_JSON = GOOD_LINES.replace('"City1"}', '"City1"')
GRPO_STAGE = "  - {{name: a, data: {root}/a.jsonl, trainer: grpo, targets: [{root}/a_test.jsonl]}}"
VERIFIABLE = "".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(6))

CASES = [
    # --- JSONL data files (ftlab train; the stage data of ftlab run below)
    Case("jsonl-bad-json", train_data("bad.jsonl", BAD_JSON), ["bad.jsonl:2", "not valid JSON"]),
    Case("jsonl-not-object", train_data("bad.jsonl", GOOD_LINES + "[1, 2]\n"), ["bad.jsonl:7", "JSON object", "list"]),
    Case("jsonl-first-line-a-list", train_data("bad.jsonl", "[1, 2]\n" + GOOD_LINES), ["bad.jsonl:1", "format"]),
    Case(
        "jsonl-missing-field",
        train_data("bad.jsonl", GOOD_LINES + json.dumps({"prompt": "x"}) + "\n"),
        ["bad.jsonl:7", "missing field 'completion'"],
    ),
    Case(
        "jsonl-wrong-type",
        train_data("bad.jsonl", GOOD_LINES + json.dumps({"prompt": "x", "completion": 5}) + "\n"),
        ["bad.jsonl:7", "'completion' must be a string"],
    ),
    Case(
        "jsonl-empty-completion",
        train_data("bad.jsonl", GOOD_LINES + json.dumps({"prompt": "x", "completion": " "}) + "\n"),
        ["bad.jsonl:7", "'completion' is empty"],
    ),
    Case(
        "jsonl-chat-bad-role",
        train_data("bad.jsonl", json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n"),
        ["bad.jsonl:1", "messages[0].role"],
    ),
    Case("jsonl-empty-file", train_data("empty.jsonl", ""), ["empty.jsonl", "empty"]),
    Case("jsonl-blank-lines-only", train_data("blank.jsonl", "\n  \n\n"), ["blank.jsonl", "empty"]),
    Case(
        "jsonl-not-utf8",
        train_data("bad.jsonl", GOOD_LINES.encode() + b'{"prompt": "caf\xe9", "completion": "b"}\n'),
        ["bad.jsonl:7", "not UTF-8"],
    ),
    Case("data-missing-file", train_data("nope.jsonl", None), ["nope.jsonl", "no such file"]),
    Case("data-folder-without-data", train_table("folder", lambda p: p.mkdir()), ["folder"]),
    Case("data-format-unknown", train_data("ok.jsonl", GOOD_LINES, format="poem"), ["data.format", "poem"]),
    Case(
        "data-format-mismatch",
        train_data("ok.jsonl", GOOD_LINES, format="preference"),
        ["ok.jsonl:1", "missing field 'chosen'"],
    ),
    Case(
        "data-columns-unknown-field",
        train_data("ok.jsonl", GOOD_LINES, columns={"question": "prompt"}),
        ["data.columns.question", "not a record field"],
    ),
    # --- CSV and parquet tables
    Case(
        "csv-missing-column",
        train_table("t.csv", text("question,completion\nQ?,A\n"), columns={"prompt": "prompt_text"}),
        ["t.csv", "no column 'prompt_text'", "columns.prompt"],
    ),
    Case(
        "csv-bad-row", train_table("t.csv", text("prompt,completion\nQ1?,A1\nQ2?,\n")), ["t.csv:row 2", "completion"]
    ),
    Case("csv-header-only", train_table("t.csv", text("prompt,completion\n")), ["t.csv", "empty"]),
    Case("csv-empty-file", train_table("t.csv", text("")), ["t.csv"]),
    Case("csv-ragged-row", train_table("t.csv", text("prompt,completion\nQ1?,A1\nQ2?,A2,extra,more\n")), ["t.csv"]),
    Case(
        "parquet-missing-column",
        train_table("t.parquet", parquet([{"question": "Q?", "completion": "A"}])),
        ["t.parquet:row 1", "prompt"],
    ),
    Case("parquet-corrupt", train_table("t.parquet", text(b"PAR1 this is not parquet")), ["t.parquet", "cannot read"]),
    # --- suites
    Case(
        "suite-bad-line",
        cli("eval", "--model", "tiny-test", "--suite", "{root}/s.jsonl", files={"s.jsonl": QA + "{oops\n"}),
        ["s.jsonl:5"],
    ),
    Case(
        "suite-missing-answer",
        cli("eval", "--model", "tiny-test", "--suite", "{root}/s.jsonl", files={"s.jsonl": QA + '{"prompt": "Q?"}\n'}),
        ["s.jsonl:5", "answer"],
    ),
    Case("suite-unknown-name", cli("eval", "--model", "tiny-test", "--suite", "world-factz"), ["world-factz"]),
    Case(
        "suite-empty-file",
        cli("eval", "--model", "tiny-test", "--suite", "{root}/s.jsonl", files={"s.jsonl": ""}),
        ["s.jsonl"],
    ),
    Case(
        "suite-wrong-scorer",
        cli("eval", "--suite", "{root}/s.jsonl", "--scorer", "choice", files={"s.jsonl": QA}),
        ["s.jsonl", "choice"],
    ),
    Case(
        "run-bad-target-suite",
        run_files(
            {"t.jsonl": QA + "{oops\n"}, stages="  - {{name: a, data: {root}/a.jsonl, targets: [{root}/t.jsonl]}}"
        ),
        ["t.jsonl:5"],
    ),
    Case("run-unknown-retained-suite", run_set("retained=[world-factz]"), ["world-factz"]),
    # --- the stage data of ftlab run: read before the output folder or a store row exists
    Case(
        "run-bad-stage-data",
        run_files(
            {"b.jsonl": GOOD_LINES + "{oops\n"},
            stages="  - {{name: a, data: {root}/b.jsonl, targets: [{root}/a_test.jsonl]}}",
        ),
        ["b.jsonl:7", "not valid JSON"],
    ),
    Case(
        "run-bad-second-stage-data",
        run_files(
            {"b.jsonl": GOOD_LINES + '{"prompt": "x"}\n'},
            stages="  - {{name: a, data: {root}/a.jsonl}}\n  - {{name: b, data: {root}/b.jsonl}}",
        ),
        ["b.jsonl:7", "completion"],
    ),
    Case(
        "run-mix-unknown-data",
        run_set("stages=[{{data: {root}/a.jsonl, mix: {{{root}/nope.jsonl: 1}}}}]"),
        ["nope.jsonl", "no such file"],
    ),
    Case(
        "run-replay-unknown-stage",
        run_set("stages=[{{data: {root}/a.jsonl, replay: {{'stage:zz': 0.5}}}}]"),
        ["stage:zz", "replay"],
    ),
    Case(
        "run-mixed-formats",
        run_files({"v.jsonl": VERIFIABLE}, stages="  - {{name: a, data: [{root}/a.jsonl, {root}/v.jsonl]}}"),
        ["stages.a.data", "different formats"],
    ),
    # --- stores (left untouched: same bytes and modification time)
    *[
        Case(f"store-{kind}-{command}", bad_store(kind, command), ["bad.db", message])
        for kind, message in STORE_MESSAGES.items()
        for command in ("run", "runs")
    ],
    # --- YAML configs
    Case(
        "yaml-syntax-error",
        config_text("run", "name: t\nstages: [\n  - oops: {\n"),
        ["cfg.yaml", "invalid YAML", "line"],
    ),
    Case("yaml-top-level-list", config_text("run", "- a\n- b\n"), ["cfg.yaml", "mapping"]),
    Case("yaml-not-utf8", config_text("train", b"model: caf\xe9\n"), ["cfg.yaml", "UTF-8"]),
    Case("yaml-missing-file", cli("run", "{root}/missing.yaml", "--store", "{store}"), ["missing.yaml"]),
    Case("yaml-is-a-folder", cli("train", "{root}"), ["is a folder"]),
    Case("yaml-unknown-key", run_set("train.lrr=0.1"), ["exp.yaml", "lrr"]),
    Case("yaml-unknown-top-key", run_set("bogus=1"), ["exp.yaml", "bogus"]),
    Case("yaml-wrong-type", run_set("train.max_steps=ten"), ["exp.yaml", "max_steps", "ten"]),
    Case("yaml-wrong-type-list", run_set("retained=world-facts"), ["exp.yaml", "retained", "list"]),
    Case("yaml-nested-unknown-key", run_set("arms=[{name: f, method: {name: full, bogus: 1}}]"), ["method.bogus"]),
    Case("yaml-unknown-method", run_set("arms=[{name: f, method: {name: sgd}}]"), ["sgd"]),
    Case("yaml-bad-method-param", run_set("arms=[{name: f, method: {name: lora, params: {rank: 8}}}]"), ["rank"]),
    Case("yaml-unknown-trainer", run_set("arms=[{name: f, trainer: ppo}]"), ["arms[0].trainer", "ppo"]),
    Case(
        "yaml-stage-unknown-trainer",
        run_set("stages=[{{data: {root}/a.jsonl, trainer: ppo}}]"),
        ["stages[0].trainer", "ppo"],
    ),
    Case("yaml-bad-post-edit", run_set("arms=[{name: f, post: {blend: [0.5]}}]"), ["post.blend"]),
    Case("yaml-bad-post-setting", run_set("arms=[{name: f, post: {scale: {gain: [0.5]}}}]"), ["post.scale", "gain"]),
    Case("yaml-bad-post-value", run_set("arms=[{name: f, post: {reset: [1.5]}}]"), ["post.reset", "1.5"]),
    Case(
        "yaml-grpo-unknown-setting", run_set("arms=[{name: g, trainer: grpo, settings: {temp: 1}}]"), ["settings.temp"]
    ),
    Case(
        "yaml-masked-thought-unknown",
        run_set("arms=[{name: f, masked_thought: {rate: 0.2}}]"),
        ["masked_thought.rate"],
    ),
    Case("yaml-no-arms", run_set("arms=[]"), ["arms"]),
    Case("yaml-no-stages", run_set("stages=[]"), ["stages"]),
    Case("yaml-duplicate-arms", run_set("arms=[{name: f}, {name: f}]"), ["arms", "unique"]),
    Case("yaml-eval-limits-unknown-suite", run_set("eval.limits={nope: 3}"), ["eval.limits", "nope"]),
    # --- command-line arguments
    Case("cli-limit-zero", cli("eval", "--suite", "world-facts", "--limit", "0"), ["--limit", "1"]),
    Case("cli-limit-negative", cli("eval", "--suite", "world-facts", "--limit", "-1"), ["--limit", "1"]),
    Case("cli-limit-not-a-number", cli("eval", "--suite", "world-facts", "--limit", "ten"), ["--limit"]),
    Case("cli-batch-size-zero", cli("eval", "--suite", "world-facts", "--batch-size", "0"), ["--batch-size"]),
    Case("cli-set-malformed", run_set("train.lr"), ["train.lr", "key.path=value"]),
    Case("cli-set-unknown-key", run_set("train.learning_rate=0.1"), ["learning_rate"]),
    Case("cli-set-bad-yaml", run_set("train.lr=[1"), ["train.lr"]),
    Case("cli-set-through-a-value", run_set("name.x=1"), ["name"]),
    Case(
        "cli-out-is-a-file",
        run_args("--out", "{root}/taken.txt", files={"taken.txt": "keep me"}),
        ["taken.txt", "is a file"],
    ),
    Case(
        "cli-edit-out-is-a-file",
        cli(
            "edit",
            "scale",
            "--base",
            "tiny-test",
            "--tuned",
            "tiny-test",
            "--factor",
            "0.5",
            "--out",
            "{root}/taken.txt",
            files={"taken.txt": "keep"},
        ),
        ["taken.txt", "--out"],
    ),
    Case(
        "cli-edit-bad-factor",
        cli("edit", "scale", "--base", "tiny-test", "--tuned", "tiny-test", "--factor", "nan", "--out", "{out}"),
        ["--factor", "nan"],
    ),
    Case(
        "cli-edit-factor-text",
        cli("edit", "scale", "--base", "tiny-test", "--tuned", "tiny-test", "--factor", "x", "--out", "{out}"),
        ["--factor"],
    ),
    Case(
        "cli-edit-bad-alpha",
        cli("edit", "lines", "--base", "tiny-test", "--tuned", "tiny-test", "--alpha", "inf", "--out", "{out}"),
        ["--alpha", "inf"],
    ),
    Case(
        "cli-edit-bad-fraction",
        cli("edit", "reset", "--base", "tiny-test", "--tuned", "tiny-test", "--fraction", "1.5", "--out", "{out}"),
        ["fraction", "1.5"],
    ),
    Case(
        "cli-edit-bad-how",
        cli(
            "edit",
            "reset",
            "--base",
            "tiny-test",
            "--tuned",
            "tiny-test",
            "--fraction",
            "0.5",
            "--how",
            "biggest",
            "--out",
            "{out}",
        ),
        ["biggest"],
    ),
    Case(
        "cli-edit-bad-density",
        cli(
            "edit",
            "merge",
            "--base",
            "tiny-test",
            "--tuned",
            "tiny-test",
            "--tuned",
            "tiny-test",
            "--method",
            "ties",
            "--density",
            "0",
            "--out",
            "{out}",
        ),
        ["density"],
    ),
    Case(
        "cli-edit-merge-one-tuned",
        cli("edit", "merge", "--base", "tiny-test", "--tuned", "tiny-test", "--out", "{out}"),
        ["--tuned"],
    ),
    Case("cli-bad-confidence", run_set("eval.confidence=1.5"), ["eval.confidence", "1.5"]),
    Case("cli-report-bad-format", cli("report", "abc", "--format", "pdf"), ["--format", "pdf"]),
    Case(
        "cli-unknown-suite",
        cli("edit", "tuco", "--base", "tiny-test", "--tuned", "tiny-test", "--suite", "nope-x"),
        ["nope-x"],
    ),
    Case("cli-unknown-option", cli("eval", "--suite", "world-facts", "--limt", "3"), ["--limt"]),
    Case("cli-missing-argument", cli("run"), ["experiment"]),
    # --- model folders
    Case("model-missing-path", cli("eval", "--model", "{root}/no-model", "--suite", "world-facts"), ["no-model"]),
    Case(
        "model-no-config", model_folder(lambda env, f: copy_model(env, f, skip=("config.json",))), ["m", "config.json"]
    ),
    Case(
        "model-config-not-json",
        model_folder(lambda env, f: (copy_model(env, f), (f / "config.json").write_text("{"))),
        ["config.json"],
    ),
    Case(
        "model-no-weights",
        model_folder(lambda env, f: copy_model(env, f, skip=("model.safetensors",))),
        ["m", "weights"],
    ),
    Case("model-corrupt-safetensors", model_folder(corrupt_safetensors), ["model.safetensors"]),
    Case("model-adapter-base-missing", model_folder(adapter_without_base), ["gone-base"]),
    Case(
        "model-config-no-model-type",
        model_folder(lambda env, f: (copy_model(env, f), (f / "config.json").write_text("{}"))),
        ["m", "config.json", "model_type"],
    ),
    Case(
        "model-unknown-model-type",
        model_folder(lambda env, f: edit_config(env, f, model_type="bogus")),
        ["m", "config.json", "bogus"],
    ),
    Case(
        "model-weights-do-not-fit",
        model_folder(lambda env, f: edit_config(env, f, hidden_size=32)),
        ["m", "do not fit"],
    ),
    Case(
        "model-no-tokenizer",
        model_folder(lambda env, f: copy_model(env, f, skip=("tokenizer.json", "tokenizer_config.json"))),
        ["m", "tokenizer"],
    ),
    Case(
        "model-unknown-hub-id",
        cli("eval", "--model", "nobody-xyz/no-such-model", "--suite", "world-facts"),
        ["nobody-xyz/no-such-model"],
    ),
    Case(
        "model-edit-bad-tuned",
        cli("edit", "scale", "--base", "tiny-test", "--tuned", "{root}/gone", "--factor", "0.5", "--out", "{out}"),
        ["gone"],
    ),
    Case("model-run-bad-base", run_set("base={root}/gone-base"), ["gone-base"]),
    Case("model-train-bad-model", train_set("model={root}/gone-model"), ["gone-model"]),
    # --- numeric ranges (ftlab run: nothing written; ftlab train: no output folder)
    Case("range-max-steps-negative", run_set("train.max_steps=-5"), ["train.max_steps", "-5"]),
    Case("range-max-steps-zero", run_set("train.max_steps=0"), ["train.max_steps", "0"]),
    Case("range-epochs-zero", run_set("train.epochs=0", "train.max_steps=-1"), ["epochs"]),
    Case("range-lr-zero", run_set("train.lr=0"), ["train.lr"]),
    Case("range-lr-negative", run_set("train.lr=-1e-4"), ["train.lr"]),
    Case("range-lr-nan", run_set("train.lr=.nan"), ["train.lr"]),
    Case("range-batch-size-zero", run_set("train.batch_size=0"), ["train.batch_size", "0"]),
    Case("range-grad-accum-zero", run_set("train.grad_accum=0"), ["train.grad_accum"]),
    Case("range-warmup-ratio", run_set("train.warmup_ratio=1.5"), ["train.warmup_ratio", "1.5"]),
    Case("range-scheduler", run_set("train.scheduler=bogus"), ["train.scheduler", "bogus"]),
    Case("range-save-steps", run_set("train.save_steps=-1"), ["train.save_steps"]),
    Case("range-weight-decay", run_set("train.weight_decay=-0.1"), ["train.weight_decay"]),
    Case("range-logging-steps", run_set("train.logging_steps=0"), ["train.logging_steps"]),
    Case("range-eval-batch-size", run_set("eval.batch_size=0"), ["eval.batch_size", "0"]),
    Case("range-eval-limit", run_set("eval.limit=0"), ["eval.limit", "0"]),
    Case("range-eval-limits", run_set("eval.limits={{{root}/a_test.jsonl: 0}}"), ["eval.limits", "0"]),
    Case(
        "range-eval-max-new-tokens",
        run_set("eval.max_new_tokens={{{root}/a_test.jsonl: -2}}"),
        ["eval.max_new_tokens", "-2"],
    ),
    Case("range-stage-max-length", run_set("stages=[{{data: {root}/a.jsonl, max_length: 0}}]"), ["max_length", "0"]),
    Case("range-stage-limit", run_set("stages=[{{data: {root}/a.jsonl, limit: -3}}]"), ["limit", "-3"]),
    Case(
        "range-replay-ratio",
        run_set("stages=[{{data: {root}/a.jsonl, replay: {{{root}/a.jsonl: 1.5}}}}]"),
        ["replay", "1.5"],
    ),
    Case("range-mix-weight", run_set("stages=[{{data: {root}/a.jsonl, mix: {{{root}/a.jsonl: -1}}}}]"), ["mix", "-1"]),
    Case("range-lora-r", run_set("arms=[{name: l, method: {name: lora, params: {r: 0}}}]"), ["r"]),
    Case("range-lora-dropout", run_set("arms=[{name: l, method: {name: lora, params: {dropout: 1.5}}}]"), ["dropout"]),
    Case(
        "range-sparse-proportion",
        run_set("arms=[{name: s, method: {name: sparse, params: {proportion: 1.5}}}]"),
        ["proportion"],
    ),
    Case("range-dpo-beta", run_set("arms=[{name: d, trainer: dpo, settings: {beta: -1}}]"), ["beta"]),
    Case("range-dpo-beta-nan", run_set("arms=[{name: d, trainer: dpo, settings: {beta: .nan}}]"), ["dpo.beta"]),
    Case(
        "range-dpo-label-smoothing",
        run_set("arms=[{name: d, trainer: dpo, settings: {label_smoothing: 0.7}}]"),
        ["label_smoothing"],
    ),  # fmt: skip
    Case("range-grpo-beta-inf", run_set("arms=[{name: g, trainer: grpo, settings: {beta: .inf}}]"), ["grpo.beta"]),
    Case(
        "range-grpo-num-generations",
        run_set("arms=[{name: g, trainer: grpo, settings: {num_generations: 1}}]"),
        ["num_generations"],
    ),
    Case(
        "range-masked-thought-ratio",
        run_set("arms=[{name: f, masked_thought: {ratio: 1.5}}]"),
        ["masked_thought", "ratio"],
    ),
    Case("range-train-max-length", train_set("data.max_length=0"), ["data.max_length", "0"]),
    Case("range-train-limit", train_set("data.limit=0"), ["data.limit", "0"]),
    Case("range-train-validation", train_set("data.validation=1.5"), ["data.validation", "1.5"]),
    Case("range-train-max-steps", train_set("train.max_steps=0"), ["train.max_steps"]),
    Case("range-train-trainer", train_set("train.trainer=dpo"), ["train.trainer"]),
    Case(
        "range-train-method-param-type",
        train_set("method={name: lora, params: {r: '8'}}"),
        ["run.yaml", "method.params.r"],
    ),
]


# ------------------------------------------------------------------ the check
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny model saved as a Hugging Face folder (safetensors), copied by the model-folder cases."""
    from ftlab.models import save_model, tiny_model, tiny_tokenizer

    return save_model(tiny_model(), tiny_tokenizer(), tmp_path_factory.mktemp("saved") / "model")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (folders too)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


def check_clean_error(output: str, exit_code: int, says: list[str]) -> str:
    """Exit code 2, no traceback, one ``error:`` line that is the last line and holds every ``says``."""
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    missing = [s for s in says if s not in errors[0]]
    assert not missing, (missing, errors[0])
    return errors[0]


def test_the_table_holds_at_least_45_kinds():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids) >= 45
    groups = {i.split("-")[0] for i in ids}
    assert {"jsonl", "csv", "parquet", "suite", "yaml", "cli", "model", "range", "run", "store"} <= groups


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_line_and_nothing_is_written(case, tmp_path, saved_model, monkeypatch):
    root = tmp_path / "case"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("FTLAB_STORE", str(root / "default.db"))
    env = Env(root, saved_model)
    args = case.build(env)
    before = snapshot(root)
    done = runner.invoke(app, args)
    check_clean_error(done.output, done.exit_code, [s.format(root=root) for s in case.says])
    assert snapshot(root) == before, "something was written"
    assert not env.out.exists() and not env.store.exists()
