"""Weight edits streamed over safetensors shards: bounded memory whatever the model's size.

``stream_edit`` runs a registered weight edit (``EDITS[name].prepare``, the same code as the in-memory
``apply_edit``; ``ftlab.edits.chunks``) over checkpoints on disk. Every input is opened lazily with
``safetensors.safe_open`` and read one row chunk at a time (at most ``CHUNK_ELEMENTS`` entries, cast to fp32), the
file being opened for that read and closed after it, so no input ever has more than one chunk in memory. An edit
that needs whole-model statistics (TIES thresholds and majority sign, the ``reset how=smallest`` threshold, LiNeS's
default α after a merge) makes its statistics passes over the chunks first, then the writing pass. Each output
tensor is assembled in the dtype the tuned checkpoint stores it in (the arithmetic is fp32 per chunk), and output
shards of at most ``max_shard_bytes`` are written as they fill, with ``model.safetensors.index.json`` when there is
more than one. So the peak memory is about one output shard plus a few chunks, not whole fp32 copies of every model.

A head tied to the input embedding (the same values in every input, as ``params.tied_aliases`` decides in memory) is
edited once, as the embedding, and written as its copy; a checkpoint saved with tied embeddings usually stores only
the embedding, and the output then does too.

A tuned input may be a PEFT LoRA adapter folder (``models.adapter_base``): its base checkpoint is streamed and each
target weight gets ``B @ A · scaling`` added chunk by chunk (``transpose``d for embeddings and ``fan_in_fan_out``),
which is what ``merge_and_unload`` computes. It may also be an ftlab diff folder (``ftlab.diffs``, what ``ftlab run``
saves for sparse methods): its base is streamed with the stored tuned values written into each chunk, in the dtype
the diff records. Adapters with anything else (DoRA, ``modules_to_save``, trained biases,
other PEFT types) are not streamed; ``open_checkpoint`` returns None for them, as for references that are not a
local safetensors checkpoint (``tiny-test``, ``.bin`` weights), and the caller loads the models instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ftlab.atomic import replace_dir, write_json
from ftlab.edits.chunks import Inputs, Rows, row_chunks
from ftlab.params import check_compatible, is_embedding

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB output shards: the output's share of the peak memory
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files of a model folder that are not weights and travel with the edited model (config, tokenizer, chat template).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_NOT_COPIED = {"adapter_config.json", "ftlab_edit.json", WEIGHTS_INDEX, "pytorch_model.bin.index.json"}
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                              r"chat_template\.(jinja|json)|.*\.model|.*\.tiktoken)$")  # fmt: skip
_LORA_KEY = re.compile(
    r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$|^base_model\.model\.(.+)\.(lora_embedding_A|lora_embedding_B)$"
)  # noqa: E501


@dataclass
class LoraDelta:
    """One LoRA pair, giving ``transpose(B @ A) · scaling`` row chunk by row chunk (fp32)."""

    A: torch.Tensor  # r x in (embedding: r x num_embeddings)
    B: torch.Tensor  # out x r (embedding: dim x r)
    scaling: float
    transposed: bool  # an embedding, or a Conv1D with fan_in_fan_out: the weight is (B @ A)^T

    def rows(self, rows: Rows) -> torch.Tensor:
        if self.transposed:
            part = self.A if rows is ... else self.A[:, rows]
            return (part.T @ self.B.T) * self.scaling
        return ((self.B if rows is ... else self.B[rows]) @ self.A) * self.scaling

    def shape(self) -> tuple[int, ...]:
        return (self.A.shape[1], self.B.shape[0]) if self.transposed else (self.B.shape[0], self.A.shape[1])


@dataclass
class Checkpoint:
    """A model's weights on disk, read lazily: safetensors files (one or an index of shards), plus LoRA deltas.

    Attributes:
        folder: the model folder (config and other files are copied from it).
        files: key -> the safetensors file holding it.
        shapes, dtypes: each key's shape and stored dtype (from the file headers, no data read).
        lora: key -> the LoRA delta added to it (an adapter folder on ``folder``'s model).
        extra_folder: a folder whose tokenizer files replace ``folder``'s (the adapter folder), or None.
        saved: key -> (file, name) of a whole tensor that replaces the checkpoint's (an adapter's saved embedding).
        diff, diff_file: an ftlab diff folder's table (key -> row of ``ftlab_diff.json``) and its weights file: the
            tuned values it stores replace the base's entries (``ftlab.diffs``).
    """

    folder: Path
    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    lora: dict[str, LoraDelta] = field(default_factory=dict)
    extra_folder: Path | None = None
    saved: dict[str, tuple[Path, str]] = field(default_factory=dict)
    diff: dict[str, dict[str, Any]] = field(default_factory=dict)
    diff_file: Path | None = None

    def read(self, key: str, rows: Rows = ...) -> torch.Tensor:
        """Rows of a tensor as fp32 (the LoRA delta added); the file is open only for this read."""
        value = self._get(key, rows)
        if not value.is_floating_point():
            return value.clone()
        value = value.to(torch.float32, copy=True)
        delta = self.lora.get(key)
        return value + delta.rows(rows) if delta is not None else value

    def raw(self, key: str, rows: Rows = ...) -> torch.Tensor:
        """Rows of a tensor as stored (dtype of the file, no LoRA delta), a copy independent of the file."""
        return self._get(key, rows).clone()

    def _get(self, key: str, rows: Rows) -> torch.Tensor:
        # open for this read only: the file's mapped pages are released when it closes
        file, name = self.saved.get(key, (self.files[key], key))
        row = self.diff.get(key)
        if row is not None and row["stored"] == "dense":
            file, name = self.diff_file, f"dense/{key}"
        with safe_open(str(file), "pt") as f:
            value = f.get_tensor(name) if rows is ... else f.get_slice(name)[rows]
        if row is None or row["stored"] == "dense":
            return value
        return self._sparse_rows(key, rows, value)

    def _sparse_rows(self, key: str, rows: Rows, value: torch.Tensor) -> torch.Tensor:
        """``value`` (the base's rows) with the diff's stored entries inside these rows written in."""
        with safe_open(str(self.diff_file), "pt") as f:
            idx = f.get_tensor(f"sparse.indices/{key}").long()
            new = f.get_tensor(f"sparse.values/{key}")
        value = value.to(new.dtype, copy=True)  # in the diff's dtype: a bf16 base may hold fp32 tuned values
        per_row = math.prod(self.shapes[key][1:]) if self.shapes[key] else 1
        first = 0 if rows is ... else rows.start * per_row
        inside = (idx >= first) & (idx < first + value.numel())
        value.view(-1)[idx[inside] - first] = new[inside]
        return value

    def nbytes(self) -> int:
        """Bytes of the weight files on disk."""
        return sum(p.stat().st_size for p in set(self.files.values()))

    def order(self) -> list[str]:
        """Keys in file order (files as listed by the index, names sorted within a file)."""
        by_file: dict[Path, list[str]] = {}
        for k, p in self.files.items():
            by_file.setdefault(p, []).append(k)
        return [k for p in by_file for k in sorted(by_file[p])]


def open_checkpoint(ref: str | os.PathLike | None, base: str | os.PathLike | None = None) -> Checkpoint | None:
    """A lazily read checkpoint for a model reference, or None when it cannot be streamed (load it instead).

    Args:
        ref: a local model folder with ``model.safetensors`` (or an index of shards), the embedded model's name, a hub
            id already in the local cache, a PEFT LoRA adapter folder, or an ftlab diff folder on such a checkpoint.
        base: for an adapter folder, the base model to put it on (default: the base its config records).
    """
    from ftlab.diffs import META_FILE, WEIGHTS_FILE, is_diff, output_kind, read_meta
    from ftlab.models import adapter_base

    recorded = adapter_base(ref)
    if recorded is not None:
        where = base or recorded
        chained = Path(recorded).is_dir() and output_kind(recorded) in ("adapter", "diff")  # a run's later stage
        if not str(where) or adapter_base(where) is not None or chained:
            return None
        inner = open_checkpoint(where)
        if inner is None:
            return None
        found = read_lora(Path(ref), inner.shapes)
        if found is None:
            return None
        lora, saved = found
        extra = Path(ref) if any(_TOKENIZER_FILES.match(p.name) for p in Path(ref).iterdir()) else None
        weights = Path(ref) / "adapter_model.safetensors"
        return Checkpoint(inner.folder, inner.files, inner.shapes, inner.dtypes, lora, extra,
                          {k: (weights, name) for k, name in saved.items()})  # fmt: skip
    if is_diff(ref):  # a diff on a plain checkpoint; one on an earlier stage's adapter or diff is loaded instead
        meta = read_meta(ref)
        inner = open_checkpoint(meta["base"])
        table = meta["tensors"]
        if inner is None or inner.diff or inner.lora or any(k not in inner.shapes for k in table):
            return None
        folder = Path(ref).expanduser()
        dtype = getattr(torch, meta["dtype"], None) if isinstance(meta.get("dtype"), str) else None
        dtypes = {k: dtype if dtype is not None and d.is_floating_point else d for k, d in inner.dtypes.items()}
        has_tokenizer = any(_TOKENIZER_FILES.match(p.name) for p in folder.iterdir() if p.name != META_FILE)
        extra = folder if has_tokenizer else None
        return Checkpoint(inner.folder, inner.files, inner.shapes, dtypes, inner.lora, extra or inner.extra_folder,
                          inner.saved, table, folder / WEIGHTS_FILE)  # fmt: skip
    folder = _local_folder(ref)
    return checkpoint_from_folder(folder) if folder is not None else None


def checkpoint_from_folder(folder: Path) -> Checkpoint | None:
    """The checkpoint of a folder holding ``model.safetensors`` or ``model.safetensors.index.json``, else None."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    elif (folder / WEIGHTS).is_file():
        names = [WEIGHTS]
    else:
        return None
    if not all((folder / n).is_file() for n in names):
        return None
    files, shapes, dtypes = {}, {}, {}
    for name in names:
        with safe_open(str(folder / name), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(k)
                files[k], shapes[k] = folder / name, tuple(sl.get_shape())
                dtype = DTYPES.get(sl.get_dtype())
                dtypes[k] = dtype if dtype is not None else f.get_tensor(k).dtype
    return Checkpoint(folder, files, shapes, dtypes)


def read_lora(folder: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, LoraDelta], dict[str, str]] | None:
    """The LoRA deltas of an adapter folder by target key, and the keys whose whole tensor the adapter saves
    (``<module>.base_layer.weight`` of an embedding target, a resized embedding): ``(deltas, {key: adapter key})``.
    None when the adapter is not a plain LoRA that fits ``shapes``."""
    from peft import LoraConfig, PeftConfig
    from peft.utils.other import get_pattern_key

    weights = folder / "adapter_model.safetensors"
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        return None
    plain = isinstance(config, LoraConfig) and not config.use_dora and not config.modules_to_save
    plain = plain and not getattr(config, "trainable_token_indices", None) and not config.layer_replication
    if not plain or not weights.is_file():
        return None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, str] = {}
    with safe_open(str(weights), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = _LORA_KEY.match(k)
            if m is None:
                key = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
                if key not in shapes or tuple(f.get_slice(k).get_shape()) != tuple(shapes[key]):
                    return None  # a bias, a magnitude vector, something else: not a plain LoRA
                saved[key] = k
                continue
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(module, {})[part] = f.get_tensor(k).float()
    out = {}
    for module, p in pairs.items():
        embedding = set(p) == {"lora_embedding_A", "lora_embedding_B"}
        if set(p) != {"lora_A", "lora_B"} and not embedding:
            return None
        A, B = (p["lora_embedding_A"], p["lora_embedding_B"]) if embedding else (p["lora_A"], p["lora_B"])
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(A.shape[0]) if config.use_rslora else alpha / A.shape[0]
        key = module + ".weight"
        delta = LoraDelta(A, B, float(scaling), embedding or bool(config.fan_in_fan_out))
        if key not in shapes or tuple(shapes[key]) != delta.shape():
            return None
        out[key] = delta
    return out, saved


def _local_folder(ref: str | os.PathLike | None) -> Path | None:
    """The local folder of a model reference, or None (``tiny-test``, a hub id not in the cache)."""
    from ftlab.models import EMBEDDED_NAME, TINY_NAME, resolve

    if ref is not None and str(ref) == TINY_NAME:
        return None
    if ref is None or str(ref) == EMBEDDED_NAME or Path(ref).expanduser().exists():
        return Path(resolve(ref))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), local_files_only=True))
    except Exception:  # not cached (or not a hub id): the caller loads the model, which reports what is wrong
        return None


def find_aliases(checkpoints: list[Checkpoint]) -> dict[str, str]:
    """Heads tied to the input embedding: ``{head: embedding}`` when equal in every checkpoint (compared by chunks)."""
    shapes = checkpoints[0].shapes
    embeds = [k for k, s in shapes.items() if is_embedding(k) and len(s) == 2]
    heads = [k for k, s in shapes.items() if ("lm_head" in k or "embed_out" in k) and len(s) == 2]
    out = {}
    for h in heads:
        for e in embeds:
            if shapes[h] == shapes[e] and all(_same(c, h, e) for c in checkpoints):
                out[h] = e
                break
    return out


def _same(c: Checkpoint, a: str, b: str) -> bool:
    return all(torch.equal(c.read(a, rows), c.read(b, rows)) for rows in row_chunks(c.shapes[a]))


def stream_edit(
    name: str,
    base: Checkpoint,
    tuned: list[Checkpoint],
    out: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    finish: Callable[[Path], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run the weight edit ``name`` over checkpoints on disk and write the edited model folder atomically.

    Args:
        name: a weight edit of ``EDITS``.
        base: the base checkpoint.
        tuned: the fine-tuned checkpoints (one, or several for ``merge``); the output keeps the first one's dtypes,
            config and tokenizer files.
        out: the output folder (replaced atomically).
        max_shard_bytes: largest output shard.
        finish: called with the temporary folder before it replaces ``out`` (to add files such as a record).
        **settings: the edit's settings.

    Returns:
        ``{"tensors", "shards", "bytes", "seconds"}``.

    Raises:
        ValueError: an unknown edit, settings that do not fit, or checkpoints that do not fit together (nothing is
            written then).
    """
    from ftlab.edits import EDITS

    if name not in EDITS or EDITS[name].composite:
        weights = [k for k, e in EDITS.items() if not e.composite]
        raise ValueError(f"unknown edit {name!r} (a weight edit); choose from {', '.join(weights)}")
    if EDITS[name].prepare is None:
        raise ValueError(f"edit {name!r} has no prepare step, so it cannot stream; it runs in memory (apply_edit)")
    if not tuned or (name != "merge" and len(tuned) != 1):
        raise ValueError(f"{name} takes {'at least' if name == 'merge' else 'exactly'} one fine-tuned model")
    start = time.perf_counter()
    meta = {k: torch.empty(s, device="meta") for k, s in base.shapes.items()}
    for i, t in enumerate(tuned):
        what = "tuned" if len(tuned) == 1 else f"tuned[{i}]"
        check_compatible(meta, {k: torch.empty(s, device="meta") for k, s in t.shapes.items()}, what=what)
    aliases = find_aliases([base, *tuned])
    order = tuned[0].order()
    keys = [k for k in order if k not in aliases]
    floating = {k for k in keys if base.dtypes[k].is_floating_point}

    def read():
        for k in sorted(floating):
            for rows in row_chunks(base.shapes[k]):
                yield k, rows, base.read(k, rows), [t.read(k, rows) for t in tuned]

    step = EDITS[name].prepare(
        Inputs({k: base.shapes[k] for k in keys}, floating, len(tuned), read, aliases), **settings
    )

    def edited(key: str) -> torch.Tensor:
        src = aliases.get(key, key)
        if src not in floating:
            return tuned[0].raw(key)
        value = torch.empty(base.shapes[src], dtype=tuned[0].dtypes[key])
        for rows in row_chunks(base.shapes[src]):
            value[rows] = step(src, rows, base.read(src, rows), [t.read(src, rows) for t in tuned])
        return value

    from safetensors.torch import save_file

    shards = _shard_plan(order, {k: _nbytes(tuned[0], k) for k in order}, max_shard_bytes)
    with replace_dir(out) as tmp:
        _copy_support_files(tuned[0], tmp)
        weight_map = {}
        for file, shard_keys in shards:
            tensors = {k: edited(k) for k in shard_keys}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map |= {k: file for k in shard_keys}
            del tensors
        total = sum(_nbytes(tuned[0], k) for k in order)
        if len(shards) > 1:
            write_json(tmp / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if finish is not None:
            finish(tmp)
    return {"tensors": len(order), "shards": len(shards), "bytes": total, "seconds": time.perf_counter() - start}


def _nbytes(c: Checkpoint, key: str) -> int:
    return math.prod(c.shapes[key]) * c.dtypes[key].itemsize


def _shard_plan(order: list[str], sizes: dict[str, int], max_bytes: int) -> list[tuple[str, list[str]]]:
    """Keys cut into consecutive shards of at most ``max_bytes`` (a larger tensor alone), with their file names."""
    groups: list[list[str]] = [[]]
    used = 0
    for k in order:
        if groups[-1] and used + sizes[k] > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += sizes[k]
    if len(groups) == 1:
        return [(WEIGHTS, groups[0])]
    n = len(groups)
    return [(f"model-{i:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups, start=1)]


def _copy_support_files(c: Checkpoint, dest: Path) -> None:
    """Config, generation config and tokenizer files beside the weights (an adapter's tokenizer files win)."""
    for src in (c.folder, c.extra_folder):
        if src is None:
            continue
        for p in src.iterdir():
            if not p.is_file() or p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if src == c.extra_folder and not _TOKENIZER_FILES.match(p.name):
                continue
            shutil.copy2(p, dest / p.name)


def load_weights_into(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy a saved checkpoint's tensors into ``model`` one tensor at a time (cast to each parameter's dtype).

    Keys the model lacks are an error; a model parameter the checkpoint lacks keeps its value (a tied head).
    """
    c = checkpoint_from_folder(Path(folder))
    if c is None:
        raise ValueError(f"{folder}: no model.safetensors or {WEIGHTS_INDEX}")
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(c.shapes) - set(own))
    if unknown:
        raise ValueError(f"{folder}: tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for k in c.order():
            own[k].copy_(c.raw(k).to(own[k].dtype))
