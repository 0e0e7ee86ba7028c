"""Where training data comes from: a JSONL file, a built-in set, or anything ``datasets`` reads.

``resolve_train_data`` turns a reference into something ``load_records`` takes, in this order:

- an existing folder: a ``load_from_disk`` folder (``state.json`` or ``dataset_dict.json`` in it), else a folder of
  data files that ``datasets.load_dataset`` reads (splits from the file names, as ``datasets`` infers them);
- a ``.json``, ``.csv``, ``.tsv``, ``.parquet`` or ``.arrow`` file, read by ``datasets``' own builder (CSV cells as
  text); rows are named ``file:row N``;
- any other path that exists or ends in ``.jsonl``: JSONL, read line by line (``file:line``), as before;
- a built-in name (``fictional-capitals``, ...);
- a path that starts with ``/``, ``./``, ``../`` or ``~`` and does not exist is an error;
- anything else is a hub data set name: ``datasets.load_dataset(name, split=...)``, which answers from the local cache
  when the hub is offline (``HF_HUB_OFFLINE=1``) and downloads only when online.

``hold_out`` takes the validation records: a seeded fraction of the training records, or another source.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftlab.config import ConfigError
from ftlab.data.records import DataError, Table, load_records

READERS = {".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def builtin_train_sets() -> dict[str, Any]:
    """Name -> zero-argument function returning a list of records."""
    from ftlab.tasks import arithmetic_task, fictional_capitals_train_records

    return {
        "fictional-capitals": fictional_capitals_train_records,
        "single-digit-addition": lambda: arithmetic_task(n=79, split="train"),
    }


def resolve_train_data(ref: str, split: str = "train") -> Any:
    """A JSONL path stays a path; a built-in name becomes a ``datasets.Dataset`` of its records; a table file, a
    folder or a hub data set becomes a ``Table`` of the split ``split`` (a split name or a slice, ``train[:80%]``).

    Raises:
        DataError: naming the reference: a missing file, a split a source does not have, a file ``datasets`` cannot
            read, a hub data set that is neither in the local cache (offline) nor on the hub.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return _read_table(ref, path, split)
    if path.suffix in READERS:
        if not path.exists():
            raise DataError(f"{ref}: no such file")
        return _read_table(ref, path, split)
    if ref.startswith(("/", "./", "../", "~")) and not path.exists():
        raise DataError(f"{ref}: no such file or folder")
    sets = builtin_train_sets()
    if path.exists() or ref.endswith(".jsonl") or ref in sets:
        if split != "train":
            raise DataError(f"{ref}: has no split {split!r}; a JSONL file or built-in set is one split, 'train'")
        if ref in sets and not path.exists():
            from datasets import Dataset

            return Dataset.from_list(sets[ref]())
        return ref
    return _read_hub(ref, split, sets)


def load_train_data(
    ref: str, fmt: str = "auto", limit: int | None = None, split: str = "train", columns: dict[str, str] | None = None
) -> tuple[list[dict], str]:
    """``load_records`` of ``resolve_train_data(ref, split)`` with a column mapping (record field -> column)."""
    return load_records(resolve_train_data(ref, split), fmt, limit, columns)


def hold_out(
    records: list[dict],
    validation: float | str | None,
    seed: int,
    fmt: str,
    columns: dict[str, str] | None = None,
    where: str = "data.validation",
) -> tuple[list[dict], list[dict]]:
    """Split off the validation records: ``(train, validation)``.

    Args:
        records: the loaded training records.
        validation: None (no validation), a fraction in (0, 1) of ``records`` (at least one record, drawn with
            ``seed``; both parts keep their order), or a reference ``resolve_train_data`` takes, loaded with the
            training data's format and column mapping.
        seed: the run's seed.
        fmt: the training records' format.
        columns: the training data's column mapping.
        where: the config key, for messages.

    Raises:
        ConfigError: a fraction outside (0, 1), or one that leaves no training record.
    """
    if validation is None or validation == "":
        return records, []
    if isinstance(validation, (int, float)):
        if not 0 < validation < 1:
            raise ConfigError(f"{where}: {validation} is not a fraction in (0, 1), nor a file")
        n = max(1, round(validation * len(records)))
        if n >= len(records):
            raise ConfigError(f"{where}: {validation} of {len(records)} records leaves none to train on")
        held = set(random.Random(seed).sample(range(len(records)), n))
        return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
    return records, load_train_data(validation, fmt, columns=columns)[0]


def _read_table(ref: str, path: Path, split: str) -> Table:
    try:
        with _quiet():
            data = _load_table(path, split, ref)
    except DataError:
        raise
    except Exception as err:  # datasets' and pyarrow's many read errors: a file the user can fix
        raise DataError(f"{ref}: {_read_error(err, split)}") from None
    return Table(data, ref)


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars and no logged errors from ``datasets`` while it reads a user's file: a file it cannot read
    becomes one ``DataError`` line, not a logged traceback followed by the error."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars = datasets.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _load_table(path: Path, split: str, ref: str) -> Any:
    import datasets

    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        data = _split_of(datasets.load_from_disk(str(path)), split, ref)
    elif path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.suffix in {*READERS, ".jsonl"}]
        if not files:
            raise DataError(f"{ref}: a folder with no data files (.jsonl, {', '.join(READERS)}) in it")
        csvs = all(p.suffix == ".csv" for p in files)
        kwargs = [_csv_kwargs(p) for p in files][0] if csvs else {}
        data = datasets.load_dataset(str(path), split=split, **kwargs)
    else:
        kwargs = _csv_kwargs(path) if READERS[path.suffix] == "csv" else {}
        data = datasets.load_dataset(READERS[path.suffix], data_files=str(path), split=split, **kwargs)
    return data


def _csv_kwargs(path: Path) -> dict[str, Any]:
    """Read every column of a CSV/TSV file as text (the header names them; an empty cell is ``""``)."""
    from datasets import Features, Value

    sep = "\t" if path.suffix == ".tsv" else ","
    header = _check_csv(path, sep)
    return {"sep": sep, "na_filter": False, "features": Features({name: Value("string") for name in header})}


def _check_csv(path: Path, sep: str) -> list[str]:
    """The header of a CSV/TSV file, after checking the whole file: UTF-8 text (a byte-order mark is allowed), a
    header of distinct names, at least one row, and as many cells in every row as the header has names.

    Raises:
        DataError: naming the file and the row (``file:row N``, the N-th row after the header).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = csv.reader(fh, delimiter=sep)
            header = next(rows, [])
            if not any(name.strip() for name in header):
                raise DataError(f"{path}: the file is empty (no header row naming the columns)")
            if len(set(header)) != len(header):
                twice = sorted({n for n in header if header.count(n) > 1})
                raise DataError(f"{path}: the header names column {twice[0]!r} twice")
            n = 0
            for cells in rows:
                if not cells:
                    continue  # a blank line
                n += 1
                if len(cells) != len(header):
                    raise DataError(
                        f"{path}:row {n}: {len(cells)} cells, but the header names {len(header)} columns "
                        f"({', '.join(header)})"
                    )
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start + 1} of the file)") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if not n:
        raise DataError(f"{path}: the file is empty (a header and no rows)")
    return header


def _split_of(data: Any, split: str, ref: str) -> Any:
    """The split (a name or a slice, ``train[:80%]``) of a ``load_from_disk`` Dataset or DatasetDict."""
    from datasets import Dataset, ReadInstruction, concatenate_datasets

    parts = {"train": data} if isinstance(data, Dataset) else dict(data)
    try:
        spans = ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in parts.items()})
    except (ValueError, AssertionError) as err:
        raise DataError(f"{ref}: split {split!r}: {_first_line(err)} (splits: {', '.join(parts)})") from None
    return concatenate_datasets([parts[s.splitname].select(range(s.from_, s.to)) for s in spans])


def _read_hub(ref: str, split: str, sets: dict[str, Any]) -> Table:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    not_local = f"{ref}: not a file or a built-in data set ({', '.join(sets)}), and"
    try:
        return Table(datasets.load_dataset(ref, split=split), ref)
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{not_local} not in the local cache of hub data sets (the hub is offline)") from None
        raise DataError(f"{not_local} the hub cannot be reached ({_first_line(err)})") from None
    except DatasetNotFoundError:
        raise DataError(f"{not_local} no data set of that name on the hub") from None
    except Exception as err:  # an unknown split, a config name needed, a file that does not parse
        raise DataError(f"{ref}: {_read_error(err, split)}") from None


def _read_error(err: BaseException, split: str) -> str:
    if isinstance(err, ValueError) and "split" in str(err).lower():
        return f"split {split!r}: {_first_line(err)}"
    return f"cannot read it ({type(err).__name__}: {_first_line(err)})"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]
