"""Merging several fine-tunes of one base: Task Arithmetic and TIES, optionally followed by LiNeS.

Papers: Task Arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089); TIES-Merging (Yadav et al., NeurIPS 2023,
arXiv 2306.01708, code prateeksha10/ties-merging); LiNeS for merging (docs/methods.md, "LiNeS").

- ``task_arithmetic``: θ = θ0 + lam·Σ_t τ_t. ``lam=None`` means 1/T (the average of the fine-tunes), so merging
  identical fine-tunes returns that fine-tune.
- ``ties``: per task keep the top ``density`` fraction of |τ_t| over the whole task vector (trim), elect the sign
  of Σ_t τ̂_t per entry (zero sums take the majority sign, as the reference's ``resolve_zero_signs``), average the
  trimmed values that agree with the elected sign (disjoint mean), θ = θ0 + lam·τ_ties. ``lam=None`` means 1.
- LiNeS (``lines_beta`` given): θ = θ0 + LiNeS(τ_MTL) with τ_MTL = Σ τ_t (task arithmetic) or τ_ties, no global
  coefficient; α defaults to (‖Σ τ_t‖₁ / ‖τ_MTL‖₁) / T as in the LiNeS code (1/T for task arithmetic).

The paper's choice of lam and β on validation data is left to the caller (``ftlab run`` sweeps).
"""

from __future__ import annotations

import torch

from ftlab.edits import lines
from ftlab.params import StateDict, check_compatible

NAME = "merge"
METHODS = ("task_arithmetic", "ties")


def merge(
    base_sd: StateDict,
    tuned_sds: list[StateDict],
    method: str = "task_arithmetic",
    lam: float | None = None,
    density: float = 0.2,
    lines_alpha: float | None = None,
    lines_beta: float | None = None,
    n_layers: int | None = None,
) -> StateDict:
    """Merge fine-tunes of ``base_sd``.

    Args:
        base_sd: base weights, fp32.
        tuned_sds: one state dict per fine-tune, same keys and shapes as the base.
        method: ``task_arithmetic`` or ``ties``.
        lam: global coefficient on the merged task vector (default 1/T for task arithmetic, 1 for TIES).
        density: TIES: fraction of each task vector's entries kept by magnitude (the paper's k = 20%).
        lines_alpha: LiNeS α on the merged task vector (default: the LiNeS code's norm ratio / T).
        lines_beta: LiNeS β; giving it switches LiNeS on (and replaces ``lam``).
        n_layers: number of blocks for LiNeS; inferred when None.

    Returns:
        The merged state dict.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if not tuned_sds:
        raise ValueError("merge needs at least one fine-tuned state dict")
    for i, sd in enumerate(tuned_sds):
        check_compatible(base_sd, sd, what=f"tuned[{i}]")
    use_lines = lines_beta is not None
    if lines_alpha is not None and not use_lines:
        raise ValueError("LiNeS for merging needs lines_beta (the reference sweeps β); lines_alpha alone is ambiguous")
    if use_lines and lam is not None:
        raise ValueError("lam and LiNeS are exclusive: LiNeS replaces the global coefficient on the merged vector")
    T = len(tuned_sds)
    if method == "task_arithmetic":
        merged = {k: _delta_sum(base_sd, tuned_sds, k) for k in base_sd}
        coef = 1.0 / T if lam is None else lam
    else:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        merged = _ties(base_sd, tuned_sds, density)
        coef = 1.0 if lam is None else lam
    if use_lines:
        if lines_alpha is None:
            total = sum(float(_delta_sum(base_sd, tuned_sds, k).abs().sum()) for k in base_sd if _float(base_sd[k]))
            mtl = sum(float(v.abs().sum()) for k, v in merged.items() if _float(base_sd[k]))
            lines_alpha = (total / mtl) / T if mtl > 0 else 1.0 / T
        merged = lines.scale_delta(merged, lines.layer_scales(list(merged), lines_alpha, lines_beta, n_layers))
        coef = 1.0
    return {k: base_sd[k] + coef * merged[k] if _float(base_sd[k]) else tuned_sds[0][k].clone() for k in base_sd}


def apply(base_sd: StateDict, tuned_sd: StateDict | list[StateDict], **settings) -> StateDict:
    """``merge`` with the edit signature: ``tuned_sd`` is one state dict or a list of them."""
    return merge(base_sd, tuned_sd if isinstance(tuned_sd, list) else [tuned_sd], **settings)


def _float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _delta_sum(base_sd: StateDict, tuned_sds: list[StateDict], k: str) -> torch.Tensor:
    if not _float(base_sd[k]):
        return torch.zeros_like(base_sd[k])
    return sum((sd[k] - base_sd[k] for sd in tuned_sds), torch.zeros_like(base_sd[k]))


def _trim_threshold(base_sd: StateDict, tuned_sd: StateDict, density: float) -> float:
    """|τ| value at which the top ``density`` fraction of the whole task vector starts (reference: kthvalue)."""
    mags = torch.cat([(tuned_sd[k] - b).abs().flatten() for k, b in base_sd.items() if _float(b)])
    d = mags.numel()
    keep = int(d * density)
    if keep >= d:
        return 0.0
    # the reference keeps |τ| >= the (d - keep)-th smallest value
    return float(torch.kthvalue(mags, max(d - keep, 1)).values)


def _ties(base_sd: StateDict, tuned_sds: list[StateDict], density: float) -> StateDict:
    keys = [k for k, b in base_sd.items() if _float(b)]
    trimmed = []  # per task: its task vector with entries below the task's threshold zeroed
    for sd in tuned_sds:
        threshold = _trim_threshold(base_sd, sd, density)
        task = {}
        for k in keys:
            d = sd[k] - base_sd[k]
            task[k] = d * (d.abs() >= threshold)
        trimmed.append(task)
    sums = {k: sum((t[k] for t in trimmed), torch.zeros_like(base_sd[k])) for k in keys}
    # Entries whose trimmed sum is exactly 0 take the sign of the majority of elected signs (whole model).
    total_sign = sum(float(torch.sign(v).sum()) for v in sums.values())
    majority = -1.0 if total_sign < 0 else 1.0
    merged = {k: torch.zeros_like(b) for k, b in base_sd.items() if k not in sums}
    for k in keys:
        sign = torch.sign(sums.pop(k))
        sign = torch.where(sign == 0, majority, sign)
        values = torch.stack([t.pop(k) for t in trimmed])  # T x *shape
        agree = torch.where(sign > 0, values > 0, values < 0)
        merged[k] = (values * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged
