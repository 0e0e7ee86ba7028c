"""Weight diffs as model outputs: a folder that holds only what a fine-tune changed, put back on its base when loaded.

A method that changes a subset of the weights (``sparse``, ``lift``, ``freeze``, ``locft``, often ``hft``) leaves
most tensors bit-identical to the model it started from. ``ftlab run`` then saves a *diff folder* instead of a whole
model::

    ftlab_diff.json      {"format": "ftlab-diff", "version": 1, "base": <model reference>, "dtype": "float32",
                          "tensors": {name: {"shape": [...], "stored": "sparse" | "dense", "changed": n}}, ...}
    diff.safetensors     per changed tensor, either
                           sparse.indices/<name>  (int32, or int64 past 2**31 entries) flat positions of the changed
                           sparse.values/<name>   entries and their new values (the tuned dtype), or
                           dense/<name>           the whole tuned tensor,
                         whichever is smaller
    tokenizer files      as ``save_pretrained`` writes them

Values are the tuned values themselves, not differences, so putting a diff on its base gives the tuned weights back
bit for bit (no rounding of ``base + delta``). Tensors that did not change are not stored. A tensor tied to an
earlier one (a tied output head) is stored once, under the first name, and the tie carries the change.

``base`` is the model the diff was taken against: a hub id, ``tiny-test``, the embedded model's name, or a local
folder (an absolute path; it may itself be an adapter or diff folder, e.g. an earlier stage of the same run).
``ftlab.models.load_model`` recognises a diff folder (``is_diff``), loads the base with the same settings and puts
the diff on it (``apply_diff``). ``iter_tensors(folder, base_reader)`` yields the tuned tensors one at a time from a
per-tensor reader of the base, for code that streams weights instead of loading a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ftlab.atomic import replace_dir
from ftlab.errors import ModelNotFoundError

FORMAT = "ftlab-diff"
VERSION = 1
META_FILE = "ftlab_diff.json"
WEIGHTS_FILE = "diff.safetensors"
# ``save: auto`` keeps a diff only when it is at most this fraction of the whole model's bytes.
AUTO_MAX_FRACTION = 0.5


def is_diff(ref: str | os.PathLike | None) -> bool:
    """True for a local folder holding ``ftlab_diff.json`` (a diff folder written by ``save_diff``)."""
    return ref is not None and (Path(ref).expanduser() / META_FILE).is_file()


def output_kind(folder: str | os.PathLike) -> str | None:
    """What a saved model folder holds: ``"diff"``, ``"adapter"`` (PEFT), ``"model"`` (a whole model) or None."""
    path = Path(folder)
    if (path / META_FILE).is_file():
        return "diff"
    if (path / "config.json").is_file():
        return "model"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    return None


def portable_ref(ref: str | os.PathLike) -> str:
    """A model reference to record in an output folder: an existing local path made absolute, else unchanged."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The diff folder's ``ftlab_diff.json``, checked for format and version."""
    path = Path(folder).expanduser() / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"{path}: not a readable diff description ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelNotFoundError(f"{path}: field 'format' is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ModelNotFoundError(f"{path}: field 'version' is {meta.get('version')!r}; this ftlab reads {VERSION}")
    if not isinstance(meta.get("base"), str) or not meta["base"]:
        raise ModelNotFoundError(f"{path}: field 'base' names no base model")
    return meta


def diff_base(folder: str | os.PathLike) -> str:
    """The base model reference a diff folder records."""
    return read_meta(folder)["base"]


# ---------------------------------------------------------------- per-tensor readers of a base model
class StateDictReader:
    """A per-tensor reader over tensors already in memory (a state dict)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd = sd

    def keys(self) -> list[str]:
        return list(self.sd)

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sd


class SafetensorsReader:
    """A lazy per-tensor reader of a model folder's safetensors files (one file or an index of shards)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            single = folder / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        self._open: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, "pt")
        return self._open[file].get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.files


def open_reader(ref: str | os.PathLike, load: Callable[[str], Any] | None = None) -> Any:
    """A per-tensor reader of a model reference: lazy for a local folder of safetensors, else the loaded model's
    state dict (``load(ref)`` returns a model; default ``ftlab.models.load_model`` on the CPU)."""
    from ftlab.models import EMBEDDED_NAME, embedded_path

    path = embedded_path() if str(ref) == EMBEDDED_NAME else Path(ref).expanduser()
    if not path.exists() and str(ref) != "tiny-test":  # a hub id: its snapshot when the local cache has it
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(ref), local_files_only=True))
        except Exception:  # not cached, or not a hub id: the model is loaded below, which says what is wrong
            pass
    if output_kind(path) == "model" and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    ):
        return SafetensorsReader(path)
    if load is None:
        from ftlab.models import load_model

        def load(r: str) -> Any:
            return load_model(r, device="cpu")[0]

    return StateDictReader(load(str(ref)).state_dict())


# ---------------------------------------------------------------- writing
def _unique_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without the names whose tensor shares storage with an earlier name (tied weights)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def compute_diff(base: Any, tuned_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a diff of ``tuned_sd`` against ``base`` (a per-tensor reader or a state dict), and its table.

    Returns:
        ``(tensors, table)``: the safetensors entries and ``{name: {"shape", "stored", "changed"}}``. A tensor the
        base lacks, or holds with another shape, is stored dense.
    """
    reader = base if hasattr(base, "get") and hasattr(base, "keys") and not isinstance(base, dict) else None
    reader = reader or StateDictReader(base)
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict] = {}
    for name, tuned in _unique_tensors(tuned_sd).items():
        tuned = tuned.detach().cpu()
        before = reader.get(name) if name in reader else None
        if before is None or tuple(before.shape) != tuple(tuned.shape):
            tensors[f"dense/{name}"] = tuned.contiguous().clone()
            table[name] = {"shape": list(tuned.shape), "stored": "dense", "changed": tuned.numel()}
            continue
        flat = tuned.reshape(-1)
        idx = (flat != before.reshape(-1).to(tuned.dtype)).nonzero().view(-1)
        if not idx.numel():
            continue
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        sparse_bytes = idx.numel() * (index_dtype.itemsize + tuned.element_size())
        if sparse_bytes < flat.numel() * tuned.element_size():
            tensors[f"sparse.indices/{name}"] = idx.to(index_dtype).contiguous()
            tensors[f"sparse.values/{name}"] = flat[idx].contiguous().clone()
            stored = "sparse"
        else:
            tensors[f"dense/{name}"] = tuned.contiguous().clone()
            stored = "dense"
        table[name] = {"shape": list(tuned.shape), "stored": stored, "changed": int(idx.numel())}
    return tensors, table


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a set of tensors (ties counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors).values())


def save_diff(
    base: Any,
    tuned: Any,
    folder: str | os.PathLike,
    base_ref: str | os.PathLike | None = None,
    tokenizer: Any = None,
    tensors: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write a diff folder for ``tuned`` against ``base``, atomically.

    Args:
        base: the model the diff is taken against: a reference (hub id, folder, ``tiny-test``; read per tensor where
            it is a safetensors folder), a per-tensor reader, or a state dict.
        tuned: the fine-tuned model or its state dict (same names as the base).
        folder: the diff folder to write (replaced if it exists).
        base_ref: the reference recorded for loading (default: ``base`` when it is a reference).
        tokenizer: saved into the folder when given.
        tensors: ``compute_diff``'s result when the caller already has it.

    Returns:
        The folder.
    """
    if base_ref is None:
        if not isinstance(base, (str, os.PathLike)):
            raise ValueError("save_diff: base_ref is needed when base is not a model reference")
        base_ref = base
    tuned_sd = tuned.state_dict() if hasattr(tuned, "state_dict") else tuned
    if tensors is None:
        reader = open_reader(base) if isinstance(base, (str, os.PathLike)) else base
        tensors = compute_diff(reader, tuned_sd)
    entries, table = tensors
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in _unique_tensors(tuned_sd).values()})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base": portable_ref(base_ref),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "changed_entries": sum(row["changed"] for row in table.values()),
        "total_entries": sum(t.numel() for t in _unique_tensors(tuned_sd).values()),
        "tensors": table,
    }
    with replace_dir(folder) as tmp:
        save_file(entries, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


# ---------------------------------------------------------------- reading
def _open_weights(folder: Path) -> Any:
    path = folder / WEIGHTS_FILE
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as err:
        raise ModelNotFoundError(f"{path}: not a readable safetensors file ({err})") from None


def _put(target: torch.Tensor, name: str, row: dict, weights: Any, where: Path) -> torch.Tensor:
    """``target`` (a base tensor) with the diff's entries for ``name`` written in place; returns it."""
    if list(target.shape) != list(row["shape"]):
        raise ModelNotFoundError(
            f"{where}: tensor {name!r} has shape {row['shape']} in the diff but {list(target.shape)} in the base"
        )
    if row["stored"] == "dense":
        target.copy_(weights.get_tensor(f"dense/{name}"))
        return target
    idx = weights.get_tensor(f"sparse.indices/{name}").long()
    values = weights.get_tensor(f"sparse.values/{name}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= target.numel()):
        raise ModelNotFoundError(f"{where}: tensor {name!r}: an index is outside a tensor of shape {row['shape']}")
    target.view(-1)[idx.to(target.device)] = values.to(device=target.device, dtype=target.dtype)
    return target


def apply_diff(model: Any, folder: str | os.PathLike) -> Any:
    """Write a diff folder's tensors into ``model`` (its base) in place; returns the model."""
    folder = Path(folder).expanduser()
    table = read_meta(folder)["tensors"]
    sd = model.state_dict()  # detached views of the parameters: writing them writes the model
    missing = sorted(set(table) - set(sd))
    if missing:
        raise ModelNotFoundError(f"{folder}: the base model has no tensor {missing[0]!r}; is 'base' the right model?")
    with _open_weights(folder) as weights, torch.no_grad():
        for name, row in table.items():
            _put(sd[name], name, row, weights, folder)
    return model


def iter_tensors(folder: str | os.PathLike, base_reader: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tuned model's tensors one at a time: each base tensor (from ``base_reader``, e.g. ``SafetensorsReader``
    or ``open_reader(diff_base(folder))``) with the diff's entries written into a copy of it.

    Tensors the diff changes but the base lacks are yielded last (they are stored dense).
    """
    folder = Path(folder).expanduser()
    table = read_meta(folder)["tensors"]
    with _open_weights(folder) as weights:
        for name in base_reader.keys():
            tensor = base_reader.get(name)
            if name in table:
                tensor = _put(tensor.clone(), name, table[name], weights, folder)
            yield name, tensor
        for name in table:
            if name not in base_reader:
                yield name, weights.get_tensor(f"dense/{name}")


def load_diff_model(
    folder: str | os.PathLike, load_base: Callable[..., tuple[Any, Any]], base: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a diff folder: ``load_base(ref, root=None)`` loads its base, then the diff is
    written in; the folder's tokenizer wins over the base's.

    The base is the one the folder records, or ``base`` when given. When the recorded base is itself an adapter or
    diff folder (an earlier stage of a run), it is kept and ``base`` goes to the bottom of that chain (``root``).
    """
    from ftlab.models import load_tokenizer

    folder = Path(folder).expanduser()
    recorded = diff_base(folder)
    chained = Path(recorded).is_dir() and output_kind(recorded) in ("adapter", "diff")
    if base and chained:
        model, tok = load_base(recorded, root=str(base))
    else:
        model, tok = load_base(str(base) if base else recorded)
    apply_diff(model, folder)
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        tok = load_tokenizer(folder)
    model.eval()
    return model, tok


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under a folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
