"""Atomic writes: a file or folder appears whole or not at all.

Everything ftlab writes for a user (summaries, reports, edit records, sparse diffs, model folders) goes through
these helpers: the content is written to a temporary name in the same folder, then renamed over the target with
``os.replace``, which is atomic on one filesystem. A crash or a full disk leaves the previous version in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_with(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: the file to (re)place; its folder is created when missing.
        write: writes the content to the temporary path it is given (e.g. ``safetensors.torch.save_file``).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


@contextmanager
def replace_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary folder beside ``target``; on success it replaces ``target`` (removed first if present).

    On an exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
