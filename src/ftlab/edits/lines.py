"""LiNeS: layer-increasing network scaling of the fine-tuning delta (Wang et al., ICLR 2025, arXiv 2410.17146).

Paper: https://arxiv.org/abs/2410.17146, code: wang-kee/LiNeS (``src/eval/eval.py::LiNeS_scaling``).

The task vector τ = θ_ft − θ0 of the key in block ℓ (ℓ = 0..L−1) is scaled by λ(ℓ) = α + β·ℓ/(L−1); every key
outside the blocks (embeddings, final norm, head) is scaled by α. Shallow blocks stay near the base, the deepest
block keeps α + β of its update. For a single fine-tune the reference uses β = 1 − α (deepest block unchanged),
which is the default here when ``beta`` is None. See docs/methods.md, "LiNeS".

Differences from the reference code:
- keys are mapped to blocks by the exact block prefix (``model.layers.<i>.``), not the substring ``.<i>.``;
- ``non_block_scale`` optionally overrides the scale of the non-block keys (default α, as in the paper), because
  a fine-tune that changed the head or chat-token embeddings can break when they are shrunk;
- with a single block (L = 1) the block counts as the deepest one (λ = α + β).
"""

from __future__ import annotations

import torch

from ftlab.edits.chunks import Inputs, Step, run_in_memory
from ftlab.params import StateDict, layer_map

NAME = "lines"


def layer_scales(
    keys: list[str],
    alpha: float,
    beta: float | None = None,
    n_layers: int | None = None,
    non_block_scale: float | None = None,
) -> dict[str, float]:
    """The LiNeS coefficient λ of every key.

    Args:
        keys: state-dict keys.
        alpha: scale of the first block and of non-block keys.
        beta: added scale at the deepest block; None means ``1 - alpha``.
        n_layers: number of blocks; inferred from the keys when None.
        non_block_scale: scale of keys outside the blocks (default ``alpha``).

    Returns:
        ``{key: λ}``.
    """
    beta = 1.0 - alpha if beta is None else beta
    outside = alpha if non_block_scale is None else non_block_scale
    layers, n = layer_map(keys, n_layers)
    denom = max(n - 1, 1)
    out = {}
    for k, ell in layers.items():
        if ell is None:
            out[k] = float(outside)
        else:
            out[k] = float(alpha + beta * (ell / denom if n > 1 else 1.0))
    return out


def scale_delta(delta: StateDict, scales: dict[str, float]) -> StateDict:
    """Apply LiNeS to a task vector (e.g. a merged one): ``τ'_key = λ(key)·τ_key``.

    Args:
        delta: task vector, fp32.
        scales: ``{key: λ}`` from ``layer_scales``.

    Returns:
        The scaled task vector (non-float entries copied unchanged).
    """
    return {k: v * scales[k] if v.is_floating_point() else v.clone() for k, v in delta.items()}


def apply(
    base_sd: StateDict,
    tuned_sd: StateDict,
    alpha: float,
    beta: float | None = None,
    n_layers: int | None = None,
    non_block_scale: float | None = None,
) -> StateDict:
    """Edited weights ``θ0 + λ(ℓ)·(θ_ft − θ0)`` for a single fine-tune.

    Args:
        base_sd: base weights, fp32.
        tuned_sd: fine-tuned weights, same keys and shapes.
        alpha: scale of the first block and of non-block keys (the reference sweeps 0.0..1.0).
        beta: extra scale reached at the last block; None means ``1 - alpha``.
        n_layers: number of blocks; inferred from the keys when None.
        non_block_scale: scale of embeddings, final norm and head (default ``alpha``).

    Returns:
        A new state dict.
    """
    return run_in_memory(
        prepare, base_sd, [tuned_sd], alpha=alpha, beta=beta, n_layers=n_layers, non_block_scale=non_block_scale
    )


def prepare(
    inputs: Inputs,
    alpha: float,
    beta: float | None = None,
    n_layers: int | None = None,
    non_block_scale: float | None = None,
) -> Step:
    """The elementwise step of ``apply`` (``ftlab.edits.chunks``): λ of every key from the key names alone."""
    lam = layer_scales(inputs.keys, alpha, beta, n_layers, non_block_scale)
    # lerp keeps λ = 1 bit-identical to the tuned weights and λ = 0 to the base.
    return lambda key, rows, base, tuned: torch.lerp(base, tuned[0], lam[key])
