"""Record formats and their loaders: JSONL files or ``datasets.Dataset`` into validated lists of dicts.

Four formats (docs/config.md, "Data"):

- ``chat``: ``{"messages": [{"role", "content"}, ...]}``; loss on assistant turns only.
- ``completion``: ``{"prompt", "completion"}``; loss on the completion only.
- ``preference``: ``{"prompt", "chosen", "rejected"}`` for DPO.
- ``verifiable``: ``{"prompt", "answer"}`` plus an optional ``reward`` name, for GRPO and evaluation.

Every problem is reported before any training starts, naming the file, the line and the field.
"""

from __future__ import annotations

import json
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


class DataError(InputError):
    """Bad training or evaluation data; the message names file, line and field."""


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
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def load_records(source: str | Path | Any, fmt: str = "auto", limit: int | None = None) -> tuple[list[dict], str]:
    """Load and validate records from a JSONL path or a ``datasets.Dataset``.

    Args:
        source: a ``.jsonl`` path, or a ``datasets.Dataset`` (rows are validated the same way).
        fmt: one of FORMATS, or ``"auto"`` to detect from the first record (all records must then agree).
        limit: keep only the first N records.

    Returns:
        ``(records, format)``; each record carries its ``file:line`` under the key ``_where``.

    Raises:
        DataError: naming the file, line and field of the first problem.
    """
    if isinstance(source, (str, Path)):
        name = str(source)
        rows = read_jsonl(source)
    else:
        name = "<dataset>"
        rows = [(i + 1, dict(r)) for i, r in enumerate(source)]
        if not rows:
            raise DataError(f"{name}: the data set is empty")
    if limit:
        rows = rows[:limit]
    if fmt == "auto":
        n, first = rows[0]
        fmt = detect_format(first) if isinstance(first, dict) else None
        if fmt is None:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(
                f"{name}:{n}: cannot tell the record format from fields {keys}; "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
            )
    elif fmt not in FORMATS:
        raise DataError(f"unknown record format {fmt!r}; choose from {', '.join(FORMATS)}")
    records = []
    for n, obj in rows:
        record = dict(validate(obj, fmt, f"{name}:{n}"))
        record[WHERE] = f"{name}:{n}"
        records.append(record)
    return records, fmt


def first_answer(answer: str | list[str]) -> str:
    """The reference answer of a ``verifiable`` record (the first, when it lists several accepted answers)."""
    return answer if isinstance(answer, str) else answer[0]
