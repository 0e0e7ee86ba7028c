"""Shared fixtures: offline hub, tiny models and tiny data written to tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FTLAB_PROGRESS", "0")

import pytest  # noqa: E402
from _util import write_jsonl  # noqa: E402


@pytest.fixture
def completion_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(16)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def tiny_config(tmp_path: Path, completion_file: Path):
    """A RunConfig for the tiny model that trains a few steps."""
    from ftlab.config import RunConfig, from_dict

    return from_dict(
        RunConfig,
        {
            "model": "tiny-test",
            "data": {"train": str(completion_file), "max_length": 128},
            "method": {"name": "full"},
            "train": {"lr": 1e-3, "max_steps": 4, "batch_size": 4, "logging_steps": 2},
            "output": {"dir": str(tmp_path / "out")},
        },
    )
