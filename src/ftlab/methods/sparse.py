"""LT-SFT, Lottery-Ticket Sparse Fine-Tuning: fine-tune fully, keep the K most-changed entries, start again sparse.

Paper: Ansell, Ponti, Korhonen, Vulić, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL 2022,
https://aclanthology.org/2022.acl-long.125 (code: cambridgeltl/composable-sft).

1. Snapshot every parameter. Phase 1: full fine-tuning of the maskable parameters for ``full_ft_steps`` steps
   (``ctx.train_phase``, the same loop and settings as the stage).
2. Select the K entries with the largest |theta - snapshot| over all maskable parameters (K = ``num_params``, or
   ``proportion`` of them); every entry at or above the K-th value is kept, so ties can select a few more.
3. Reset all parameters to the snapshot (not to the original base: a diff applied before stays applied).
4. Phase 2 (the stage's own training): the same data and settings with gradient masks; the trainer builds a fresh
   optimizer. With weight decay 0 every unselected entry ends bit-identical.

The result is a sparse diff: ``sparse_diff(base_sd, tuned_sd)`` extracts it, ``save_diff``/``load_diff`` store it as
safetensors (indices + values), and ``apply_diffs(sd, [d1, d2])`` composes diffs by addition (e.g. a language diff
plus a task diff, as in the paper's zero-shot transfer).

Config keys that matter: ``num_params`` / ``proportion`` (K), ``full_ft_steps``, ``train_norms``.

Differs from the paper / released code:
- one selection iteration only (the code's ``n_ft_iterations`` > 1 is not offered), no L1 penalty options;
- every parameter of the causal LM is maskable except norms (frozen, as in both released scripts); there is no
  separately stored dense head (the LM head is masked like any matrix);
- if fewer than K entries moved in phase 1, only the moved entries are selected (the code's ``>=`` threshold of 0
  would select every entry);
- the optimizer of phase 2 is the trainer's dense AdamW, as in the code: its state is as large as full fine-tuning's
  for every parameter with at least one selected entry;
- weight decay would move unselected entries (masking is on gradients); a warning says so when it is not 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ftlab.config import ConfigError
from ftlab.methods._diff import SparseDelta, apply_diffs, load_diff, save_diff, sparse_diff
from ftlab.methods.base import Plan, PlanContext
from ftlab.params import matches

NAME = "sparse"

__all__ = ["NAME", "Config", "SparseDelta", "apply_diffs", "load_diff", "plan", "save_diff", "sparse_diff"]


@dataclass
class Config:
    num_params: int = 0  # K, entries that train in phase 2; 0 uses ``proportion``
    proportion: float = 0.01  # K as a fraction of the maskable entries (composable-sft's ft_params_proportion)
    full_ft_steps: int = -1  # phase-1 optimizer steps; -1: as many as the stage (train.max_steps, else its epochs)
    train_norms: bool = False  # norms are frozen in both released scripts

    def __post_init__(self) -> None:
        if self.num_params < 0 or not 0 < self.proportion <= 1:
            raise ConfigError("method.params: num_params must be >= 0 and proportion in (0, 1]")


def select_most_changed(
    after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], k: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Masks of the ``k`` entries that moved most between two sets of tensors (ties at the threshold included).

    Args:
        after: name -> tensor after phase 1.
        before: name -> tensor at the snapshot (same names and shapes).
        k: number of entries to keep.

    Returns:
        ``(masks, threshold)``: bool masks per name, and the K-th largest |change|.
    """
    deltas = {n: (after[n].detach().float() - before[n].float()).abs() for n in after}
    flat = torch.cat([d.view(-1).cpu() for d in deltas.values()])  # (N,) every maskable entry
    k = min(k, flat.numel())
    threshold = float(torch.topk(flat, k).values[-1])
    del flat
    if threshold > 0:
        return {n: d >= threshold for n, d in deltas.items()}, threshold
    return {n: d > 0 for n, d in deltas.items()}, threshold


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Run phase 1 on ``model``, pick the K most-changed entries, reset, and plan phase 2 on them.

    Args:
        model: the model (trained in place during phase 1, then reset to its snapshot).
        cfg: LT-SFT settings.
        ctx: needs ``train_phase`` and ``train_dataset`` (``train_sft`` supplies both).

    Returns:
        A plan whose gradient masks are the selected entries.
    """
    if ctx.train_phase is None or ctx.train_dataset is None:
        raise ConfigError("sparse: the plan context needs train_phase and train_dataset for its phase-1 fine-tune")
    if ctx.train_cfg is not None and ctx.train_cfg.weight_decay:
        warnings.warn("sparse: weight_decay != 0 moves unselected entries; set train.weight_decay=0", stacklevel=2)
    params = dict(model.named_parameters())
    maskable = [n for n in params if cfg.train_norms or not matches(n, "*norm*")]
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in maskable)
    steps = cfg.full_ft_steps
    if steps == -1:
        steps = ctx.train_cfg.max_steps if ctx.train_cfg is not None else -1
    ctx.train_phase(model, ctx.train_dataset, steps)
    total = sum(params[n].numel() for n in maskable)
    k = cfg.num_params or max(1, round(cfg.proportion * total))
    masks, threshold = select_most_changed({n: params[n] for n in maskable}, {n: snapshot[n] for n in maskable}, k)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
            p.grad = None
    del snapshot
    grad_masks = {n: m for n, m in masks.items() if bool(m.any())}
    selected = sum(int(m.sum()) for m in grad_masks.values())
    return Plan(
        trainable=set(grad_masks),
        grad_masks=grad_masks,
        info={
            "k": k,
            "selected": selected,
            "threshold": threshold,
            "density": round(selected / total, 6),
            "full_ft_steps": steps,
            "per_param": {n: int(m.sum()) for n, m in grad_masks.items()},
        },
    )
