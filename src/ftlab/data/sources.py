"""Named training data sets shipped with ftlab, so a config can say ``data.train: fictional-capitals``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def builtin_train_sets() -> dict[str, Any]:
    """Name -> zero-argument function returning a list of records."""
    from ftlab.tasks import arithmetic_task, fictional_capitals_train_records

    return {
        "fictional-capitals": fictional_capitals_train_records,
        "single-digit-addition": lambda: arithmetic_task(n=79, split="train"),
    }


def resolve_train_data(ref: str) -> Any:
    """A path stays a path; a built-in name becomes a ``datasets.Dataset`` of its records."""
    if Path(ref).exists() or ref.endswith(".jsonl"):
        return ref
    sets = builtin_train_sets()
    if ref not in sets:
        raise FileNotFoundError(f"data.train: {ref!r} is neither a file nor a built-in data set ({', '.join(sets)})")
    from datasets import Dataset

    return Dataset.from_list(sets[ref]())
