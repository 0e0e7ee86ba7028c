"""Turn records into token ids and labels for SFT: chat template applied by the tokenizer, loss on answers only.

A chat conversation is rendered turn by turn with the tokenizer's own template; the text each assistant turn adds
(its content and end-of-turn marker) is the only part with labels, everything else is ``-100``. A ``completion``
record is the chat ``[user: prompt, assistant: completion]`` when the tokenizer has a chat template, and plain
``prompt + completion + EOS`` otherwise.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ftlab.data.records import WHERE, DataError

IGNORE = -100


def as_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation a record stands for (chat and completion formats)."""
    if fmt == "chat":
        return record["messages"]
    if fmt == "completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise DataError(f"format '{fmt}' has no SFT target; use chat or completion records")


def segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_assistant)`` pieces whose concatenation is the full text."""
    if tokenizer.chat_template is None:
        pieces = []
        for m in messages:
            trainable = m["role"] == "assistant"
            pieces.append((m["content"] + (tokenizer.eos_token if trainable else ""), trainable))
        return pieces
    pieces, done = [], ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError("the chat template does not render conversations incrementally; cannot mask turns")
        pieces.append((prefix[len(done) :], False))
        pieces.append((full[len(prefix) :], True))
        done = full
    return pieces


def encode(record: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one chat or completion record."""
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.chat_template is None and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trainable in segments(as_messages(record, fmt), tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trainable else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def sft_dataset(
    records: list[dict[str, Any]],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    truncate: bool = False,
) -> Dataset:
    """Tokenize every record up front (so bad data fails before training) into a ``datasets.Dataset``.

    Args:
        records: validated records (``ftlab.data.load_records``).
        fmt: ``chat`` or ``completion``.
        tokenizer: the model's tokenizer.
        max_length: longest allowed sequence in tokens.
        truncate: cut longer records instead of raising.

    Returns:
        A dataset with ``input_ids`` and ``labels`` columns, ready for TRL's SFTTrainer.
    """
    rows = []
    for i, record in enumerate(records):
        where = record.get(WHERE, f"record {i}")
        row = encode(record, fmt, tokenizer)
        if len(row["input_ids"]) > max_length:
            if not truncate:
                raise DataError(
                    f"{where}: record is {len(row['input_ids'])} tokens, over data.max_length={max_length} "
                    "(raise max_length or set data.truncate=true)"
                )
            row = {k: v[:max_length] for k, v in row.items()}
        if all(t == IGNORE for t in row["labels"]):
            raise DataError(f"{where}: no tokens to learn from after templating (field 'completion'/'messages')")
        rows.append(row)
    return Dataset.from_list(rows)
