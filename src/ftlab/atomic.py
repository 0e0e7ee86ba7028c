"""Atomic writes: a file or folder appears whole or not at all.

Everything ftlab writes for a user (summaries, reports, edit records, sparse diffs, model folders) goes through
these helpers: the content is written to a temporary name in the same folder, then renamed over the target with
``os.replace``, which is atomic on one filesystem. A crash or a full disk leaves the previous version in place.

A full disk (``ENOSPC``, or a library's error that says so) while writing becomes ``DiskFullError``, an
``InputError`` with one line naming the path ("disk full while writing <path>: ..."), after the temporary file or
folder is removed. ``remove_temps`` sweeps temporaries a killed process left behind (their names start with a dot, so
no reader takes them for outputs).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftlab import faults
from ftlab.errors import InputError

# Messages of errors that mean "no space left" where the error is not an OSError with ENOSPC (safetensors' Rust
# writer, SQLite).
_DISK_FULL_WORDS = ("no space left on device", "storagefull", "database or disk is full", "disk quota exceeded")


class DiskFullError(InputError):
    """The disk filled up while ftlab wrote a file; what was there before is left as it was."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the disk or quota is full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(err).lower().replace(" ", "") for word in (w.replace(" ", "") for w in _DISK_FULL_WORDS)):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    """The one-line error for a full disk while writing ``path``."""
    detail = (
        err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0] if str(err) else ""
    )
    return DiskFullError(f"disk full while writing {path}: {detail or type(err).__name__}; free some space and rerun")


def remove_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of atomic writes a killed process left anywhere under ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob(".*") if _is_temp(p.name)]
    for path in sorted(found, key=lambda p: len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    return found


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or ".old-" in name)


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
        faults.point("write")
        os.replace(tmp, path)
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
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
    """Fill a temporary folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is first renamed aside (``.<name>.old-*``), so at no moment does a half-deleted folder sit
    under the final name; it is removed once the new folder is in place. On an exception the temporary folder is
    removed and ``target`` is left as it was; a full disk becomes ``DiskFullError``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    old = None
    try:
        try:
            yield tmp
        except DiskFullError:
            raise
        except Exception as err:
            if is_disk_full(err):
                raise disk_full(target, err) from err
            raise
        faults.point("save")
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / target.name, target)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
