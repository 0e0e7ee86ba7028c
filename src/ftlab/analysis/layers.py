"""Where a fine-tune changed the weights: Frobenius norms of the delta per key, per block and per module kind.

For every group of keys, ``delta_norm`` = ‖θ_ft − θ0‖_F, ``base_norm`` = ‖θ0‖_F, ``relative`` = their ratio and
``changed`` = fraction of entries that differ at all (0 for frozen parameters, which shows what a sparse method
touched). Groups pool their keys (square root of the summed squares).
"""

from __future__ import annotations

import torch

from ftlab.params import StateDict, check_compatible, layer_map, module_kind, tied_aliases


def layer_change(base_sd: StateDict, tuned_sd: StateDict) -> dict:
    """Per-key, per-block, per-module and overall change of a fine-tune.

    Args:
        base_sd: base weights.
        tuned_sd: fine-tuned weights, same keys and shapes.

    Returns:
        ``{"total", "per_layer", "per_module", "non_block", "per_key"}``; each entry has ``delta_norm``,
        ``base_norm``, ``relative``, ``changed`` and ``numel``. A tied head copy is counted once (as the embedding).
    """
    check_compatible(base_sd, tuned_sd)
    aliases = tied_aliases(base_sd, tuned_sd)
    keys = [k for k, v in base_sd.items() if v.is_floating_point() and k not in aliases]
    layers, n_layers = layer_map(keys)
    stats = {k: _stats(base_sd[k], tuned_sd[k]) for k in keys}
    per_layer = [_pool([stats[k] for k in keys if layers[k] == ell]) | {"layer": ell} for ell in range(n_layers)]
    kinds = sorted({module_kind(k) for k in keys if layers[k] is not None})
    per_module = {m: _pool([stats[k] for k in keys if layers[k] is not None and module_kind(k) == m]) for m in kinds}
    non_block = {k: _finish(stats[k]) for k in keys if layers[k] is None}
    return {
        "total": _pool(list(stats.values())),
        "per_layer": per_layer,
        "per_module": per_module,
        "non_block": non_block,
        "per_key": {k: _finish(s) for k, s in stats.items()},
    }


def _stats(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, float]:
    delta = tuned.float() - base.float()
    return {
        "delta_sq": float((delta.double() ** 2).sum()),
        "base_sq": float((base.double() ** 2).sum()),
        "n_changed": float((delta != 0).sum()),
        "numel": float(delta.numel()),
    }


def _pool(items: list[dict[str, float]]) -> dict[str, float | None]:
    total = {key: sum(s[key] for s in items) for key in ("delta_sq", "base_sq", "n_changed", "numel")}
    return _finish(total)


def _finish(s: dict[str, float]) -> dict[str, float | None]:
    d, b = s["delta_sq"] ** 0.5, s["base_sq"] ** 0.5
    return {
        "delta_norm": d,
        "base_norm": b,
        "relative": d / b if b > 0 else (0.0 if d == 0 else None),
        "changed": s["n_changed"] / s["numel"] if s["numel"] else 0.0,
        "numel": int(s["numel"]),
    }
