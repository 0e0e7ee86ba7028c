"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228).

Code: reeceshuttle/intruder-dimensions (``find_intruder_dimensions.py``); docs/methods.md, "Intruder dimensions".
For every 2-D weight matrix inside the transformer blocks (the authors' "all_linear": attention and MLP
projections), in HF Linear layout (out x in): thin SVDs of W0 and W_ft in fp32, C = |U_ftᵀ U0| over the left
singular vectors (the output space); fine-tuned vector j (among the top k by singular value) is an intruder when
max_i C[j, i] < ε over all base vectors. The score is the count summed over matrices (k = 10, ε = 0.5 as the
authors).

Added beside the count, as a control (a random direction also scores below ε): the intruder energy share,
Σ σ_j² over intruders / ‖W_ft‖_F², per matrix and pooled over matrices. A LoRA adapter must be merged first
(``merge_and_unload``); ``ftlab analyze intruders`` does that for an adapter folder given as ``--tuned``.
Transposed layouts (GPT-2 ``Conv1D``, in x out) are not detected; they would compare right singular vectors.
"""

from __future__ import annotations

import time

import torch

from ftlab.params import StateDict, check_compatible, layer_map, module_kind


def target_keys(base_sd: StateDict) -> list[str]:
    """Keys of the 2-D floating-point weights inside the blocks."""
    layers, _ = layer_map(list(base_sd))
    return [k for k, v in base_sd.items() if layers[k] is not None and v.dim() == 2 and v.is_floating_point()]


def intruder_dimensions(base_sd: StateDict, tuned_sd: StateDict, k: int = 10, eps: float = 0.5) -> dict:
    """Count intruder dimensions of one fine-tune.

    Args:
        base_sd: base weights.
        tuned_sd: fine-tuned weights (LoRA merged), same keys and shapes.
        k: number of top fine-tuned singular vectors examined per matrix.
        eps: similarity threshold; below it a vector is an intruder.

    Returns:
        ``{"total", "n_matrices", "energy_share", "per_layer", "per_module", "matrices", "k", "eps", "seconds"}``.
    """
    return compare_intruders(base_sd, {"tuned": tuned_sd}, k, eps)["tuned"]


def compare_intruders(
    base_sd: StateDict, tuned_sds: dict[str, StateDict], k: int = 10, eps: float = 0.5, threads: int | None = 1
) -> dict:
    """``intruder_dimensions`` for several fine-tunes of one base (e.g. LoRA vs full), sharing the base SVDs.

    Args:
        base_sd: base weights.
        tuned_sds: name -> fine-tuned weights.
        k: top fine-tuned singular vectors examined per matrix.
        eps: similarity threshold.
        threads: CPU threads for the SVDs (None: torch's setting). One is the default because MKL's threaded SVD
            of these small matrices slows down by 10-30x when the cores are shared with other work.

    Returns:
        name -> the dict described in ``intruder_dimensions``.
    """
    for name, sd in tuned_sds.items():
        check_compatible(base_sd, sd, what=name)
    layers, n_layers = layer_map(list(base_sd))
    start = time.perf_counter()
    rows: dict[str, list[dict]] = {name: [] for name in tuned_sds}
    before = torch.get_num_threads()
    if threads is not None and base_sd and next(iter(base_sd.values())).device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        for key in target_keys(base_sd):
            u0 = torch.linalg.svd(base_sd[key].float(), full_matrices=False).U  # out x r
            for name, sd in tuned_sds.items():
                row = _one_matrix(u0, sd[key].float(), k, eps)
                rows[name].append({"key": key, "layer": layers[key], "module": module_kind(key), **row})
    finally:
        torch.set_num_threads(before)
    seconds = time.perf_counter() - start
    return {name: _summary(r, n_layers, k, eps, seconds) for name, r in rows.items()}


def _one_matrix(u0: torch.Tensor, w_ft: torch.Tensor, k: int, eps: float) -> dict:
    u, s, _ = torch.linalg.svd(w_ft, full_matrices=False)
    top = u[:, :k]  # out x k, columns ordered by singular value
    sim = (top.T @ u0).abs().amax(dim=1)  # k: best match of each fine-tuned vector over all base vectors
    intruder = sim < eps
    energy = float((s[:k][intruder] ** 2).sum())
    total_energy = float((s**2).sum())
    return {
        "count": int(intruder.sum()),
        "similarity": [round(float(x), 4) for x in sim],
        "intruder_energy": energy,
        "energy": total_energy,
        "energy_share": energy / total_energy if total_energy > 0 else 0.0,
    }


def _summary(rows: list[dict], n_layers: int, k: int, eps: float, seconds: float) -> dict:
    per_layer = [0] * n_layers
    per_module: dict[str, int] = {}
    for r in rows:
        per_layer[r["layer"]] += r["count"]
        per_module[r["module"]] = per_module.get(r["module"], 0) + r["count"]
    energy = sum(r["energy"] for r in rows)
    return {
        "total": sum(r["count"] for r in rows),
        "n_matrices": len(rows),
        "energy_share": sum(r["intruder_energy"] for r in rows) / energy if energy > 0 else 0.0,
        "per_layer": per_layer,
        "per_module": per_module,
        "matrices": rows,
        "k": k,
        "eps": eps,
        "seconds": round(seconds, 3),
    }
