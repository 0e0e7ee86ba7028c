"""Merging several fine-tunes of one base: Task Arithmetic and TIES, optionally followed by LiNeS.

Papers: Task Arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089); TIES-Merging (Yadav et al., NeurIPS 2023,
arXiv 2306.01708, code prateeksha10/ties-merging); DARE (Yu et al., "Language Models are Super Mario", ICML 2024,
arXiv 2311.03099); LiNeS for merging (docs/methods.md, "LiNeS").

- ``task_arithmetic``: θ = θ0 + lam·Σ_t τ_t. ``lam=None`` means 1/T (the average of the fine-tunes), so merging
  identical fine-tunes returns that fine-tune.
- ``ties``: per task keep the top ``density`` fraction of |τ_t| over the whole task vector (trim), elect the sign
  of Σ_t τ̂_t per entry (zero sums take the majority sign, as the reference's ``resolve_zero_signs``), average the
  trimmed values that agree with the elected sign (disjoint mean), θ = θ0 + lam·τ_ties. ``lam=None`` means 1.
- ``dare``: per task drop each entry of τ_t with probability p = 1 − ``density`` and divide the kept ones by
  ``density`` (seeded per task, tensor and chunk), then task arithmetic on the results (``lam=None`` means 1/T);
  ``dare_ties``: the same drops, then TIES's sign election and disjoint mean (``lam=None`` means 1).
- LiNeS (``lines_beta`` given): θ = θ0 + LiNeS(τ_MTL) with τ_MTL = Σ τ_t (task arithmetic) or τ_ties, no global
  coefficient; α defaults to (‖Σ τ_t‖₁ / ‖τ_MTL‖₁) / T as in the LiNeS code (1/T for task arithmetic).

The paper's choice of lam and β on validation data is left to the caller (``ftlab run`` sweeps).

Whole-model statistics are computed in passes over row chunks (``ftlab.edits.chunks``), so the same code streams
shards from disk: TIES takes two passes for the exact trim thresholds (a radix select equal to ``kthvalue`` over
the whole task vector) and one for the majority sign; LiNeS's default α one more for the two L1 norms. Then one
elementwise step writes the weights.
"""

from __future__ import annotations

import torch

from ftlab.edits import lines
from ftlab.edits.chunks import Inputs, Rows, Step, chunk_seed, kth_smallest, run_in_memory
from ftlab.params import StateDict

NAME = "merge"
METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")


def merge(
    base_sd: StateDict,
    tuned_sds: list[StateDict],
    method: str = "task_arithmetic",
    lam: float | None = None,
    density: float = 0.2,
    lines_alpha: float | None = None,
    lines_beta: float | None = None,
    n_layers: int | None = None,
    seed: int = 0,
) -> StateDict:
    """Merge fine-tunes of ``base_sd``.

    Args:
        base_sd: base weights, fp32.
        tuned_sds: one state dict per fine-tune, same keys and shapes as the base.
        method: ``task_arithmetic``, ``ties``, ``dare`` (DARE, then task arithmetic) or ``dare_ties`` (DARE, then
            TIES's sign election and disjoint mean).
        lam: global coefficient on the merged task vector (default 1/T for task arithmetic and DARE, 1 for TIES and
            DARE-TIES).
        density: TIES: fraction of each task vector's entries kept by magnitude (the paper's k = 20%); DARE: the
            probability of keeping an entry (1 − the drop rate p), kept entries are divided by it.
        lines_alpha: LiNeS α on the merged task vector (default: the LiNeS code's norm ratio / T).
        lines_beta: LiNeS β; giving it switches LiNeS on (and replaces ``lam``).
        n_layers: number of blocks for LiNeS; inferred when None.
        seed: DARE: seed of the random drops (per fine-tune, tensor and chunk).

    Returns:
        The merged state dict.
    """
    if not tuned_sds:
        raise ValueError("merge needs at least one fine-tuned state dict")
    settings = dict(
        lam=lam, density=density, lines_alpha=lines_alpha, lines_beta=lines_beta, n_layers=n_layers, seed=seed
    )
    return run_in_memory(prepare, base_sd, tuned_sds, method=method, **settings)


def apply(base_sd: StateDict, tuned_sd: StateDict | list[StateDict], **settings) -> StateDict:
    """``merge`` with the edit signature: ``tuned_sd`` is one state dict or a list of them."""
    return merge(base_sd, tuned_sd if isinstance(tuned_sd, list) else [tuned_sd], **settings)


def prepare(
    inputs: Inputs,
    method: str = "task_arithmetic",
    lam: float | None = None,
    density: float = 0.2,
    lines_alpha: float | None = None,
    lines_beta: float | None = None,
    n_layers: int | None = None,
    seed: int = 0,
) -> Step:
    """Statistics passes and the elementwise step of ``merge`` (``ftlab.edits.chunks``)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    use_lines = lines_beta is not None
    if lines_alpha is not None and not use_lines:
        raise ValueError("LiNeS for merging needs lines_beta (the reference sweeps β); lines_alpha alone is ambiguous")
    if use_lines and lam is not None:
        raise ValueError("lam and LiNeS are exclusive: LiNeS replaces the global coefficient on the merged vector")
    T = inputs.n_tuned
    if method != "task_arithmetic" and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method == "task_arithmetic":
        coef = 1.0 / T if lam is None else lam

        def delta(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
            return _delta_sum(base, tuned)

    elif method == "dare":
        coef = 1.0 / T if lam is None else lam

        def delta(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
            return _dropped(key, rows, base, tuned, density, seed).sum(0)

    else:
        coef = 1.0 if lam is None else lam
        if method == "ties":
            thresholds = _trim_thresholds(inputs, density)

            def values(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
                return _trimmed(base, tuned, thresholds)

        else:

            def values(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
                return _dropped(key, rows, base, tuned, density, seed)

        total_sign = sum(float(torch.sign(values(*c).sum(0)).sum()) for c in inputs.chunks())
        majority = -1.0 if total_sign < 0 else 1.0

        def delta(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
            return _disjoint_mean(values(key, rows, base, tuned), majority)

    if not use_lines:
        return lambda key, rows, base, tuned: base + coef * delta(key, rows, base, tuned)
    if lines_alpha is None:
        total = mtl = 0.0
        for key, rows, base, tuned in inputs.chunks():
            total += float(_delta_sum(base, tuned).abs().sum())
            mtl += float(delta(key, rows, base, tuned).abs().sum())
        lines_alpha = (total / mtl) / T if mtl > 0 else 1.0 / T
    scales = lines.layer_scales(inputs.keys, lines_alpha, lines_beta, n_layers)
    return lambda key, rows, base, tuned: base + delta(key, rows, base, tuned) * scales[key]


def _delta_sum(base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
    return sum((t - base for t in tuned), torch.zeros_like(base))


def _trim_thresholds(inputs: Inputs, density: float) -> list[float]:
    """Per task, the |τ| value at which the top ``density`` fraction of its whole task vector starts.

    The reference keeps |τ| >= the (d − keep)-th smallest value (``kthvalue``); a task that keeps everything gets 0.
    """
    d = inputs.n_float()
    keep = int(d * density)
    if keep >= d or d == 0:
        return [0.0] * inputs.n_tuned
    k = max(d - keep, 1)
    return kth_smallest(lambda: ([(t - b).abs() for t in ts] for _, _, b, ts in inputs.chunks()), [k] * inputs.n_tuned)


def _trimmed(base: torch.Tensor, tuned: list[torch.Tensor], thresholds: list[float]) -> torch.Tensor:
    """T x *shape: each task vector with entries below its task's threshold zeroed."""
    out = []
    for t, threshold in zip(tuned, thresholds, strict=True):
        d = t - base
        out.append(d * (d.abs() >= threshold))
    return torch.stack(out)


def _dropped(key: str, rows: Rows, base: torch.Tensor, tuned: list[torch.Tensor], density: float, seed: int):
    """DARE: T x *shape, each task vector with entries dropped with probability 1 − density and the rest / density."""
    out = []
    for i, t in enumerate(tuned):
        gen = torch.Generator().manual_seed(chunk_seed(seed + 7919 * i, key, rows))
        keep = torch.rand(base.shape, generator=gen) < density
        out.append((t - base) * keep / density)
    return torch.stack(out)


def _disjoint_mean(values: torch.Tensor, majority: float) -> torch.Tensor:
    """Elect a sign per entry (zero sums take the model's majority), then average the values that agree with it."""
    sign = torch.sign(values.sum(0))
    sign = torch.where(sign == 0, majority, sign)
    agree = torch.where(sign > 0, values > 0, values < 0)
    return (values * agree).sum(0) / agree.sum(0).clamp(min=1)
