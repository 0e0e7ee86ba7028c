"""Sparse weight differences: build from two state dicts, save/load as safetensors, add onto a state dict.

A diff is ``{name: SparseDelta}``; each delta holds the flat positions and fp32 values of the entries that changed.
Composition is plain addition (Ansell et al.'s ``SFT.apply``), so applying two diffs in either order gives the same
weights up to float rounding, and applying a diff to the base it was taken from gives back the tuned weights.

File layout (safetensors): tensors ``indices/<name>`` (int64) and ``values/<name>`` (float32) per parameter, and
metadata ``format = "ftlab-sparse-diff"``, ``version = "1"``, ``shapes`` (JSON: name -> shape).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ftlab.atomic import write_with

FORMAT = "ftlab-sparse-diff"


@dataclass
class SparseDelta:
    """The changed entries of one tensor.

    Attributes:
        shape: the tensor's shape.
        indices: (nnz,) int64 positions in the flattened tensor.
        values: (nnz,) float32 differences at those positions.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor


def sparse_diff(
    base_sd: dict[str, torch.Tensor], tuned_sd: dict[str, torch.Tensor], threshold: float = 1e-7
) -> dict[str, SparseDelta]:
    """The entries where ``tuned_sd`` differs from ``base_sd`` by more than ``threshold`` (computed in fp32).

    Args:
        base_sd: the state dict the diff starts from.
        tuned_sd: the fine-tuned state dict (same keys and shapes; extra keys are an error).
        threshold: entries with ``|tuned - base| <= threshold`` are dropped (1e-7, as in composable-sft).

    Returns:
        ``{name: SparseDelta}`` for every tensor with at least one kept entry.
    """
    extra = sorted(set(tuned_sd) - set(base_sd))
    if extra:
        raise KeyError(f"tuned_sd has tensors that base_sd lacks: {extra[:5]}")
    out = {}
    for name, tuned in tuned_sd.items():
        base = base_sd[name]
        if base.shape != tuned.shape:
            raise ValueError(f"{name}: base shape {tuple(base.shape)} != tuned shape {tuple(tuned.shape)}")
        delta = (tuned.detach().float().cpu() - base.detach().float().cpu()).view(-1)
        idx = (delta.abs() > threshold).nonzero().view(-1)
        if idx.numel():
            out[name] = SparseDelta(tuple(tuned.shape), idx, delta[idx].clone())
    return out


def save_diff(diff: dict[str, SparseDelta], path: str | os.PathLike) -> Path:
    """Write a diff as one safetensors file, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, shapes = {}, {}
    for name, d in diff.items():
        tensors[f"indices/{name}"] = d.indices.to(torch.int64).contiguous()
        tensors[f"values/{name}"] = d.values.to(torch.float32).contiguous()
        shapes[name] = list(d.shape)
    meta = {"format": FORMAT, "version": "1", "shapes": json.dumps(shapes)}
    return write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_diff(path: str | os.PathLike) -> dict[str, SparseDelta]:
    """Read a diff written by ``save_diff``; a file that is not one is an error naming the file and the problem."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an ftlab sparse diff (metadata format is {meta.get('format')!r})")
    shapes = json.loads(meta.get("shapes", "{}"))
    out = {}
    for name, shape in shapes.items():
        idx, val = tensors.get(f"indices/{name}"), tensors.get(f"values/{name}")
        if idx is None or val is None or idx.shape != val.shape:
            raise ValueError(f"{path}: {name}: indices and values are missing or of different lengths")
        numel = int(torch.tensor(shape).prod()) if shape else 1
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"{path}: {name}: an index is outside a tensor of shape {tuple(shape)}")
        out[name] = SparseDelta(tuple(shape), idx, val)
    return out


def apply_diffs(sd: dict[str, torch.Tensor], diffs: list[dict[str, SparseDelta]]) -> dict[str, torch.Tensor]:
    """A new state dict: ``sd`` plus every diff (added in fp32, cast back to each tensor's dtype).

    Args:
        sd: the state dict to add onto (not modified).
        diffs: diffs to compose; each names tensors of ``sd`` with matching shapes.

    Returns:
        The composed state dict (tensors the diffs do not touch are shared with ``sd``).
    """
    out = dict(sd)
    for diff in diffs:
        for name, d in diff.items():
            if name not in out:
                raise KeyError(f"diff names {name!r}, which the state dict lacks")
            t = out[name]
            if tuple(t.shape) != tuple(d.shape):
                raise ValueError(f"{name}: diff shape {tuple(d.shape)} != tensor shape {tuple(t.shape)}")
            flat = t.detach().float().flatten().clone()
            flat.index_add_(0, d.indices.to(flat.device), d.values.to(flat.device))
            out[name] = flat.view(t.shape).to(t.dtype)
    return out
