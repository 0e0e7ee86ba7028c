"""The context-dependency indicator: a marker line added to training prompts that depend on user-given context.

From Wang et al., "On the loss of context-awareness in general instruction fine-tuning" (2024): instruction
fine-tuning with a chat template teaches a model to lean on what it already knows and attend less to context the
user supplies; their remedy marks the training examples that depend on context with an indicator, so the model
learns to follow the context when the indicator is there, and the marker is given at inference for
context-dependent questions. docs/methods.md, "Context-dependency indicator", says where ftlab differs.

A record is context-dependent when it has a true ``context_dependent`` field (a flag column; ``"true"``/``"1"``/
``"yes"`` in a CSV), or, without that field, a non-empty ``context`` field. The indicator goes in front of the
user's words: the ``prompt`` of a completion, preference or verifiable record, or the first user turn of a chat.
Records that do not depend on context are left as they are.
"""

from __future__ import annotations

from typing import Any

from ftlab.data.records import WHERE, DataError

INDICATOR = "[Answer from the context]"
FLAG_FIELD = "context_dependent"
CONTEXT_FIELD = "context"
_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n", ""}


def is_context_dependent(record: dict[str, Any]) -> bool:
    """Whether a record depends on user-given context (its flag, else a non-empty ``context`` field).

    Raises:
        DataError: a flag that is neither a boolean nor a yes/no word, naming the record and the field.
    """
    flag = record.get(FLAG_FIELD)
    if flag is not None:
        if isinstance(flag, bool | int):
            return bool(flag)
        if isinstance(flag, str) and flag.strip().lower() in _TRUE | _FALSE:
            return flag.strip().lower() in _TRUE
        where = record.get(WHERE, "record")
        raise DataError(f"{where}: field '{FLAG_FIELD}' must be true or false, got {flag!r}")
    context = record.get(CONTEXT_FIELD)
    return isinstance(context, str) and bool(context.strip())


def mark(text: str, indicator: str = INDICATOR) -> str:
    """``text`` with the indicator line in front (once: a text that already starts with it is returned as is)."""
    return text if text.startswith(indicator) else f"{indicator}\n{text}"


def add_context_indicator(records: list[dict[str, Any]], fmt: str, indicator: str = INDICATOR) -> list[dict[str, Any]]:
    """The records with the indicator added to those that depend on context (new dicts; the input is not changed).

    Args:
        records: validated records (``ftlab.data.load_records``).
        fmt: their format (``chat``, ``completion``, ``preference``, ``verifiable``).
        indicator: the marker line.

    Returns:
        One record per input record, in order; a context-dependent one has the marker in front of its prompt (chat:
        of its first user turn; a chat without a user turn is left as it is).
    """
    out = []
    for record in records:
        if not is_context_dependent(record):
            out.append(record)
            continue
        record = dict(record)
        if fmt == "chat":
            messages = [dict(m) for m in record["messages"]]
            first = next((m for m in messages if m.get("role") == "user"), None)
            if first is not None:
                first["content"] = mark(first["content"], indicator)
            record["messages"] = messages
        elif isinstance(record.get("prompt"), str):
            record["prompt"] = mark(record["prompt"], indicator)
        out.append(record)
    return out


def marked_count(records: list[dict[str, Any]]) -> int:
    """How many records depend on context (for a log line)."""
    return sum(is_context_dependent(r) for r in records)
