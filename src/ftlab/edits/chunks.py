"""The shape every weight edit has: statistics passes over the weights, then one elementwise step per row chunk.

A weight edit is written once, as ``prepare(inputs, **settings) -> step``. ``prepare`` checks the settings and
computes whatever the edit needs from the whole model (the TIES trim thresholds, the reset threshold, the LiNeS
coefficient of each key) by iterating ``inputs.chunks()`` as many times as it needs; ``step(key, rows, base,
tuned)`` then maps one row chunk of a tensor to its edited values, elementwise. Two drivers run the same code:

- ``run_in_memory`` over fp32 state dicts (the pure ``apply(base_sd, tuned_sd, ...)`` functions, the run's repair
  sweep and the tests), and
- ``ftlab.edits.stream`` over safetensors shards on disk (``ftlab edit``), reading one chunk of each input at a time.

Both cut every tensor into the same row chunks (``row_chunks``: whole rows, at most ``CHUNK_ELEMENTS`` entries) and
visit keys in the same order (sorted names), so every sum and every random draw is the same and the two results
agree bit for bit. Changing ``CHUNK_ELEMENTS`` changes the random masks of ``reset how=random`` (seeded per key and
chunk) and nothing else.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import EllipsisType

import torch

from ftlab.params import StateDict, check_compatible

CHUNK_ELEMENTS = 1 << 22  # 4M entries: 16 MB per fp32 chunk
_COUNT_BATCH = 1 << 22  # kth_smallest counts small chunks together, at most this many entries at a time
Rows = slice | EllipsisType  # a row range of a tensor, or ``...`` for a 0-d tensor
Chunk = tuple[str, Rows, torch.Tensor, list[torch.Tensor]]  # key, rows, base rows, rows of each fine-tune (fp32)
Step = Callable[[str, Rows, torch.Tensor, list[torch.Tensor]], torch.Tensor]


def row_chunks(shape: torch.Size | tuple[int, ...]) -> list[Rows]:
    """Row ranges of a tensor of ``shape``: whole rows, at most ``CHUNK_ELEMENTS`` entries each (one row at least)."""
    if len(shape) == 0:
        return [...]
    per_row = math.prod(shape[1:]) or 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)] or [slice(0, 0)]


def chunk_start(rows: Rows) -> int:
    """First row of a chunk (0 for a 0-d tensor)."""
    return 0 if rows is ... else int(rows.start)


def chunk_seed(seed: int, key: str, rows: Rows) -> int:
    """A seed for random draws over one chunk, fixed by the edit's seed, the key and the chunk's first row."""
    # 32 bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed
    return zlib.crc32(f"{int(seed)}:{key}:{chunk_start(rows)}".encode())


@dataclass
class Inputs:
    """What an edit's ``prepare`` sees of the weights.

    Attributes:
        shapes: every key the edit produces (a tied head is left out: it is written as a copy of the embedding).
        floating: the keys with floating-point values; the others are copied from the first fine-tune.
        n_tuned: how many fine-tunes (1 except for ``merge``).
        read: a fresh iterator of fp32 chunks ``(key, rows, base, [tuned, ...])`` over the floating keys in sorted
            order; every statistics pass calls it once.
        aliases: tied heads left out of ``shapes``, ``{head: embedding}``.
    """

    shapes: dict[str, torch.Size]
    floating: set[str]
    n_tuned: int
    read: Callable[[], Iterator[Chunk]]
    aliases: dict[str, str] = field(default_factory=dict)

    def chunks(self) -> Iterator[Chunk]:
        return self.read()

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    def n_float(self) -> int:
        """Entries over the floating keys."""
        return sum(math.prod(self.shapes[k]) for k in self.floating)


def memory_inputs(base_sd: StateDict, tuned_sds: list[StateDict], aliases: dict[str, str] | None = None) -> Inputs:
    """``Inputs`` over fp32 state dicts (same keys and shapes; checked); ``aliases`` names tied heads left out."""
    for i, sd in enumerate(tuned_sds):
        check_compatible(base_sd, sd, what="tuned" if len(tuned_sds) == 1 else f"tuned[{i}]")
    floating = {k for k, v in base_sd.items() if v.is_floating_point()}

    def read() -> Iterator[Chunk]:
        for k in sorted(floating):
            for rows in row_chunks(base_sd[k].shape):
                yield k, rows, base_sd[k][rows], [sd[k][rows] for sd in tuned_sds]

    return Inputs({k: v.shape for k, v in base_sd.items()}, floating, len(tuned_sds), read, dict(aliases or {}))


def run_in_memory(
    prepare: Callable[..., Step],
    base_sd: StateDict,
    tuned_sds: list[StateDict],
    aliases: dict[str, str] | None = None,
    **settings,
) -> StateDict:
    """Run an edit's ``prepare`` and ``step`` over fp32 state dicts; returns a new state dict with base's keys.

    ``aliases`` (``{head: embedding}``) records tied heads already removed from the state dicts, for ``prepare``.
    """
    if not tuned_sds:
        raise ValueError("the edit needs at least one fine-tuned state dict")
    inputs = memory_inputs(base_sd, tuned_sds, aliases)
    step = prepare(inputs, **settings)
    out: StateDict = {}
    for k, b in base_sd.items():
        if k not in inputs.floating:
            out[k] = tuned_sds[0][k].clone()
            continue
        value = torch.empty(b.shape, dtype=torch.float32)
        for rows in row_chunks(b.shape):
            value[rows] = step(k, rows, b[rows], [sd[k][rows] for sd in tuned_sds])
        out[k] = value
    return out


def kth_smallest(series: Callable[[], Iterator[list[torch.Tensor]]], ks: list[int]) -> list[float]:
    """The ``ks[i]``-th smallest (1-based) value of series ``i``, exactly, in two passes over chunks.

    Each call of ``series()`` yields, chunk by chunk, one tensor of non-negative fp32 values per series. A radix
    select on the float bits (non-negative floats sort like their bit patterns): the first pass counts the high 16
    bits, the second counts the low 16 bits inside the chosen high bucket. It equals ``torch.kthvalue`` over the
    concatenated values without ever holding them.
    """
    n = len(ks)
    high = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(n)]
    for i, bits in _bit_batches(series, n):
        high[i] += torch.bincount((bits >> 16).long(), minlength=1 << 15)
    picks, before = [], []
    for i, k in enumerate(ks):
        cum = high[i].cumsum(0)
        if not 1 <= k <= int(cum[-1]):
            raise ValueError(f"kth_smallest: k={k} outside 1..{int(cum[-1])}")
        h = int(torch.searchsorted(cum, k))
        picks.append(h)
        before.append(int(cum[h - 1]) if h > 0 else 0)
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n)]
    for i, bits in _bit_batches(series, n):
        inside = bits[(bits >> 16) == picks[i]]
        if inside.numel():
            low[i] += torch.bincount((inside & 0xFFFF).long(), minlength=1 << 16)
    out = []
    for i, k in enumerate(ks):
        lo = int(torch.searchsorted(low[i].cumsum(0), k - before[i]))
        out.append(float(torch.tensor([(picks[i] << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return out


def _bit_batches(series: Callable[[], Iterator[list[torch.Tensor]]], n: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(series index, int32 bits)`` of the values, small chunks joined into batches of about ``_COUNT_BATCH``."""
    pending: list[list[torch.Tensor]] = [[] for _ in range(n)]
    size = 0
    for chunk in series():
        for i, v in enumerate(chunk):
            pending[i].append(v.detach().float().contiguous().view(-1).view(torch.int32))
        size += chunk[0].numel() if chunk else 0
        if size >= _COUNT_BATCH:
            for i in range(n):
                yield i, torch.cat(pending[i])
            pending, size = [[] for _ in range(n)], 0
    if size:
        for i in range(n):
            yield i, torch.cat(pending[i])
