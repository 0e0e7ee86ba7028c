"""Record formats and their loaders: JSONL files, tables read through ``datasets`` or a ``datasets.Dataset`` into
validated lists of dicts.

Four formats (docs/config.md, "Data"):

- ``chat``: ``{"messages": [{"role", "content"}, ...]}``; loss on assistant turns only.
- ``completion``: ``{"prompt", "completion"}``; loss on the completion only.
- ``preference``: ``{"prompt", "chosen", "rejected"}`` for DPO.
- ``verifiable``: ``{"prompt", "answer"}`` plus an optional ``reward`` name, for GRPO and evaluation.

Every problem is reported before any training starts, naming the file, the line (``file:7``, or ``file:row 7`` for a
table) and the field. A column mapping (``columns: {prompt: question}``, record field -> column) renames a table's
columns into a format's fields first; the records are then validated exactly as JSONL records are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.errors import InputError

FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "verifiable": ("prompt", "answer"),
}
ROLES = ("system", "user", "assistant")
WHERE = "_where"  # key under which each loaded record remembers its "file:line" for later error messages
MESSAGE_KEYS = ("role", "content")  # column-mapping keys that rename the keys inside each message of `messages`
COLUMN_KEYS = tuple(sorted({f for fields in FORMATS.values() for f in fields} | {"reward"})) + MESSAGE_KEYS


class DataError(InputError):
    """Bad training or evaluation data; the message names file, line and field."""


@dataclass
class Table:
    """Rows read through ``datasets`` (a CSV, parquet, arrow or JSON file, a folder, a ``load_from_disk`` folder or a
    hub data set) under the name its errors give it: its N-th row (1-based) is ``<name>:row N``."""

    dataset: Any
    name: str


def check_columns(columns: dict[str, Any], where: str) -> None:
    """A column mapping names known record fields (or ``role``/``content`` of messages) and one column each.

    Raises:
        ConfigError: naming ``<where>.<field>``.
    """
    from ftlab.config import ConfigError

    for key, column in columns.items():
        if key not in COLUMN_KEYS:
            raise ConfigError(f"{where}.{key}: not a record field; allowed: {', '.join(COLUMN_KEYS)}")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{where}.{key}: expected a column name, got {column!r}")


def map_columns(row: Any, columns: dict[str, str], where: str) -> Any:
    """The record a row stands for under a column mapping (record field -> column); other columns stay as they are.

    ``role`` and ``content`` name the keys of each message in ``messages`` (``{from: human, value: ...}``).

    Raises:
        DataError: naming ``where``, the column and the field it was to fill.
    """
    if not columns or not isinstance(row, dict):
        return row
    fields = {k: v for k, v in columns.items() if k not in MESSAGE_KEYS}
    record = {k: v for k, v in row.items() if k not in fields.values()}
    for field, column in fields.items():
        if column not in row:
            have = ", ".join(map(str, row))
            raise DataError(f"{where}: no column '{column}' (columns.{field}); the record has {have}")
        record[field] = row[column]
    keys = {k: columns[k] for k in MESSAGE_KEYS if k in columns}
    if keys and isinstance(record.get("messages"), list):
        source = fields.get("messages", "messages")
        renamed = []
        for i, msg in enumerate(record["messages"]):
            if isinstance(msg, dict):
                for key, name in keys.items():
                    if name not in msg:
                        raise DataError(
                            f"{where}: field 'messages[{i}]' (column '{source}') has no key '{name}' (columns.{key})"
                        )
                msg = {k: v for k, v in msg.items() if k not in keys.values()} | {k: msg[n] for k, n in keys.items()}
            renamed.append(msg)
        record["messages"] = renamed
    return record


def _name_column(message: str, columns: dict[str, str]) -> str:
    """Add the source column to a validation message about a mapped field: ``field 'completion' (column 'a')``."""
    found = re.search(r"field '(\w+)[^']*'", message)
    if not found or found.group(1) not in columns or found.group(1) in MESSAGE_KEYS:
        return message
    return f"{message[: found.end()]} (column '{columns[found.group(1)]}'){message[found.end() :]}"


def detect_format(record: dict[str, Any]) -> str | None:
    """The first format whose required fields are all present (None when none fits)."""
    for name in ("chat", "preference", "completion", "verifiable"):
        if all(k in record for k in FORMATS[name]):
            return name
    return None


def validate(record: Any, fmt: str, where: str) -> dict[str, Any]:
    """Check one record against its format; ``where`` is ``file:line`` for messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in FORMATS[fmt]:
        if key not in record:
            raise DataError(f"{where}: missing field '{key}' (format '{fmt}' needs {', '.join(FORMATS[fmt])})")
    if fmt == "chat":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        for i, msg in enumerate(msgs):
            field = f"messages[{i}]"
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise DataError(f"{where}: field '{field}' needs 'role' and 'content'")
            if msg["role"] not in ROLES:
                raise DataError(f"{where}: field '{field}.role' is {msg['role']!r}; allowed: {', '.join(ROLES)}")
            if not isinstance(msg["content"], str):
                raise DataError(f"{where}: field '{field}.content' must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
        return record
    for key in FORMATS[fmt]:
        value = record[key]
        ok = isinstance(value, str) or (fmt == "verifiable" and key == "answer" and _str_list(value))
        if not ok:
            raise DataError(f"{where}: field '{key}' must be a string")
        if key != "prompt" and isinstance(value, str) and not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
    if fmt == "verifiable" and "reward" in record and not isinstance(record["reward"], str):
        raise DataError(f"{where}: field 'reward' must be the name of a reward function")
    return record


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL file into ``(line_number, object)`` pairs, skipping blank lines."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a JSONL file")
    rows = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def load_records(
    source: Any, fmt: str = "auto", limit: int | None = None, columns: dict[str, str] | None = None
) -> tuple[list[dict], str]:
    """Load and validate records from a JSONL path, a ``Table`` or a ``datasets.Dataset``.

    Args:
        source: a ``.jsonl`` path, a ``Table`` (rows named ``<name>:row N``), or a ``datasets.Dataset`` (rows
            validated the same way).
        fmt: one of FORMATS, or ``"auto"`` to detect from the first record (all records must then agree).
        limit: keep only the first N records.
        columns: record field -> column (``check_columns``); each row is mapped (``map_columns``) before it is
            validated.

    Returns:
        ``(records, format)``; each record carries its ``file:line`` (``file:row N``) under the key ``_where``.

    Raises:
        DataError: naming the file, line and field (and the column of a mapped field) of the first problem.
    """
    columns = columns or {}
    hint = ""
    if isinstance(source, (str, Path)):
        name = str(source)
        rows = [(f"{name}:{n}", obj) for n, obj in read_jsonl(source)]
    else:
        table = isinstance(source, Table)
        name, data = (source.name, source.dataset) if table else ("<dataset>", source)
        present = ", ".join(getattr(data, "column_names", None) or [])
        if present:
            for field, column in columns.items():
                if field not in MESSAGE_KEYS and column not in data.column_names:
                    raise DataError(f"{name}: no column '{column}' (columns.{field}); its columns: {present}")
            hint = f"; its columns: {present} (map them with columns: {{field: column}})"
        if limit and hasattr(data, "select"):
            data = data.select(range(min(limit, len(data))))
        label = "row " if table else ""
        rows = [(f"{name}:{label}{i}", dict(r)) for i, r in enumerate(data, start=1)]
        if not rows:
            raise DataError(f"{name}: the data set is empty")
    if limit:
        rows = rows[:limit]
    rows = [(where, map_columns(obj, columns, where)) for where, obj in rows]
    if fmt == "auto":
        where, first = rows[0]
        fmt = detect_format(first) if isinstance(first, dict) else None
        if fmt is None:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(
                f"{where}: cannot tell the record format from fields {keys}; "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
            )
    elif fmt not in FORMATS:
        raise DataError(f"unknown record format {fmt!r}; choose from {', '.join(FORMATS)}")
    records = []
    for where, obj in rows:
        try:
            record = dict(validate(obj, fmt, where))
        except DataError as err:
            message = _name_column(str(err), columns)
            raise DataError(message + (hint if "missing field" in message else "")) from None
        record[WHERE] = where
        records.append(record)
    return records, fmt


def first_answer(answer: str | list[str]) -> str:
    """The reference answer of a ``verifiable`` record (the first, when it lists several accepted answers)."""
    return answer if isinstance(answer, str) else answer[0]
