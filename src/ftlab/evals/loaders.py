"""Readers for user suite files, with the format detected from the path and the first record.

Formats (``detect_format``):

* ``qa``: JSONL of ``{"prompt", "answer"}``, answer a string or a list of acceptable strings (generative scorers).
* ``rules``: JSONL of ``{"prompt", "rules": [{"type", ...}]}`` (the built-in ``instructions`` format).
* ``choice``: JSONL of ``{"prompt", "choices": [...], "answer": index or choice text}``.
* ``arc``: ARC JSONL, ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``.
* ``ifeval``: IFEval JSONL, ``{"key", "prompt", "instruction_id_list", "kwargs"}``, mapped onto our rules;
  prompts with an instruction we cannot check (response language) are skipped, with a note on stderr.
* ``mmlu``: a CSV file or a folder of CSVs without header, ``question, A, B, C, D, answer letter``; each item's
  ``subject`` is its file name without a ``_dev`` / ``_val`` / ``_test`` suffix.
* ``text``: any other file (``.txt``, ``.raw``, ...), plain text for perplexity, cut into chunks of whole paragraphs.

Items are dicts with ``id`` and ``prompt`` plus the scorer's fields. JSONL readers for ``qa``, ``rules`` and
``choice`` keep every field of the record, so a record's own ``subject`` is kept too; ``load_suite``'s limit takes
the same number of items from each ``subject`` (``suites.limit_items``).

Every error names the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from ftlab.errors import InputError
from ftlab.evals.rules import validate_rule

TEXT_CHUNK_CHARS = 1000
MMLU_LETTERS = ("A", "B", "C", "D")


class SuiteFormatError(InputError):
    """A suite file that cannot be read; the message names the file, line and field."""


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSONL file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SuiteFormatError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(rec, dict):
                raise SuiteFormatError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            rows.append((n, rec))
    if not rows:
        raise SuiteFormatError(f"{path}: no records")
    return rows


def detect_format(path: Path) -> str:
    """The suite format of a file or folder (see the module docstring)."""
    if path.is_dir():
        if any(path.glob("*.csv")):
            return "mmlu"
        raise SuiteFormatError(f"{path}: a folder suite must hold MMLU-style .csv files")
    if path.suffix.lower() == ".csv":
        return "mmlu"
    if path.suffix.lower() not in (".jsonl", ".json"):
        return "text"
    first = read_jsonl(path)[0][1]
    if isinstance(first.get("question"), dict):
        return "arc"
    if "instruction_id_list" in first:
        return "ifeval"
    if "rules" in first:
        return "rules"
    if "choices" in first:
        return "choice"
    if "text" in first and "prompt" not in first:
        return "text"
    if "prompt" in first:
        return "qa"
    raise SuiteFormatError(
        f"{path}:1: cannot tell the suite format from fields {sorted(first)}; expected 'prompt' + 'answer', "
        "'prompt' + 'rules', 'prompt' + 'choices' + 'answer', 'text', ARC's 'question' or IFEval's "
        "'instruction_id_list'"
    )


def _need(path: Path, n: int, rec: dict, field: str, kind: type | tuple[type, ...]) -> object:
    if field not in rec:
        raise SuiteFormatError(f"{path}:{n}: missing field '{field}'")
    if not isinstance(rec[field], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SuiteFormatError(f"{path}:{n}: field '{field}' must be {names}, got {type(rec[field]).__name__}")
    return rec[field]


def _item_id(rec: dict, path: Path, n: int) -> str:
    return str(rec.get("id", rec.get("key", f"{path.stem}-{n}")))


def load_qa(path: Path) -> list[dict]:
    """Items of a ``{"prompt", "answer"}`` JSONL file."""
    items = []
    for n, rec in read_jsonl(path):
        prompt = _need(path, n, rec, "prompt", str)
        answer = _need(path, n, rec, "answer", (str, list, int, float))
        if isinstance(answer, list) and (not answer or not all(isinstance(a, str | int | float) for a in answer)):
            raise SuiteFormatError(f"{path}:{n}: field 'answer' must be a string or a non-empty list of strings")
        answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
        items.append({**rec, "id": _item_id(rec, path, n), "prompt": prompt, "answer": answers})
    return items


def load_rules(path: Path) -> list[dict]:
    """Items of a ``{"prompt", "rules"}`` JSONL file; every rule is checked for a known type and parameters."""
    items = []
    for n, rec in read_jsonl(path):
        prompt = _need(path, n, rec, "prompt", str)
        rules = _need(path, n, rec, "rules", list)
        for k, rule in enumerate(rules):
            try:
                validate_rule(rule)
            except ValueError as err:
                raise SuiteFormatError(f"{path}:{n}: field 'rules[{k}]': {err}") from None
        items.append({**rec, "id": _item_id(rec, path, n), "prompt": prompt, "rules": rules})
    return items


def _answer_index(path: Path, n: int, answer: object, labels: list[str]) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(labels):
        return answer
    if isinstance(answer, str) and answer in labels:
        return labels.index(answer)
    raise SuiteFormatError(f"{path}:{n}: field 'answer' must be a choice index or one of {labels}, got {answer!r}")


def load_choice(path: Path) -> list[dict]:
    """Items of a ``{"prompt", "choices", "answer"}`` JSONL file (answer: index or the text of a choice)."""
    items = []
    for n, rec in read_jsonl(path):
        prompt = _need(path, n, rec, "prompt", str)
        choices = [str(c) for c in _need(path, n, rec, "choices", list)]
        if len(choices) < 2:
            raise SuiteFormatError(f"{path}:{n}: field 'choices' needs at least two options")
        answer = _answer_index(path, n, rec.get("answer"), choices)
        items.append({**rec, "id": _item_id(rec, path, n), "prompt": prompt, "choices": choices, "answer": answer})
    return items


def arc_prompt(stem: str) -> str:
    """Context for an ARC question (lm-evaluation-harness's ``arc_easy`` format)."""
    return f"Question: {stem}\nAnswer:"


def load_arc(path: Path) -> list[dict]:
    """Items of an ARC JSONL file as multiple choice over the answer texts."""
    items = []
    for n, rec in read_jsonl(path):
        q = _need(path, n, rec, "question", dict)
        stem = _need(path, n, q, "stem", str)
        choices = _need(path, n, q, "choices", list)
        if not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices) or len(choices) < 2:
            raise SuiteFormatError(f"{path}:{n}: field 'question.choices' must be a list of {{'text', 'label'}}")
        labels = [str(c["label"]) for c in choices]
        key = str(_need(path, n, rec, "answerKey", (str, int)))
        items.append(
            {
                "id": _item_id(rec, path, n),
                "prompt": arc_prompt(stem),
                "choices": [str(c["text"]) for c in choices],
                "answer": _answer_index(path, n, key, labels),
            }
        )
    return items


def mmlu_prompt(question: str, options: list[str]) -> str:
    """Context for an MMLU question: the question, lettered options, then ``Answer:`` (choices are the letters)."""
    lines = [question.strip(), *(f"{letter}. {opt}" for letter, opt in zip(MMLU_LETTERS, options, strict=True))]
    return "\n".join(lines) + "\nAnswer:"


def load_mmlu(path: Path) -> list[dict]:
    """Items of an MMLU-style CSV file or folder (no header: question, A, B, C, D, answer letter)."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    items = []
    for file in files:
        subject = re.sub(r"_(dev|val|test)$", "", file.stem)
        with open(file, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if len(row) != 6:
                    raise SuiteFormatError(
                        f"{file}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                    )
                letter = row[5].strip().upper()
                if letter not in MMLU_LETTERS:
                    raise SuiteFormatError(f"{file}:{n}: field 'answer' (column 6) must be A-D, got {row[5]!r}")
                items.append(
                    {
                        "id": f"{subject}-{n}",
                        "subject": subject,
                        "prompt": mmlu_prompt(row[0], row[1:5]),
                        "choices": list(MMLU_LETTERS),
                        "answer": MMLU_LETTERS.index(letter),
                    }
                )
    return items


def chunk_text(text: str, chunk_chars: int = TEXT_CHUNK_CHARS) -> list[str]:
    """Cut text into chunks of about ``chunk_chars`` characters at paragraph or line boundaries.

    Paragraphs are separated by blank lines; a paragraph longer than ``chunk_chars`` is split at its line breaks
    (files such as WikiText's raw dump put one paragraph per line, with no blank lines). Pieces are joined until a
    chunk reaches ``chunk_chars``; a single longer line is its own chunk, never cut inside.
    """
    pieces: list[tuple[str, str]] = []  # (separator before the piece, piece)
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        if not lines:
            continue
        if len(para.strip()) <= chunk_chars:
            pieces.append(("\n\n", "\n".join(lines)))
        else:
            pieces.extend((("\n\n" if i == 0 else "\n"), ln) for i, ln in enumerate(lines))
    chunks, cur = [], ""
    for sep, piece in pieces:
        cur = f"{cur}{sep}{piece}" if cur else piece
        if len(cur) >= chunk_chars:
            chunks.append(cur)
            cur = ""
    if cur:
        chunks.append(cur)
    return chunks


def load_text(path: Path) -> list[dict]:
    """Perplexity items: a plain-text file cut into paragraph chunks, or a JSONL of ``{"text"}`` records."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return [
            {"id": _item_id(rec, path, n), "prompt": "", "text": _need(path, n, rec, "text", str)}
            for n, rec in read_jsonl(path)
        ]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SuiteFormatError(f"{path}: not UTF-8 text (byte {err.start}); pass a .txt file for perplexity") from None
    chunks = chunk_text(text)
    if not chunks:
        raise SuiteFormatError(f"{path}: no text")
    return [{"id": f"{path.stem}-{i}", "prompt": "", "text": c} for i, c in enumerate(chunks)]
