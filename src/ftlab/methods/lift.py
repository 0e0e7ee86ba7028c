"""LIFT, Low-rank Informed Sparse Fine-Tuning: train only the entries that dominate a low-rank view of each matrix.

Paper: Liu et al., "LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for
Reasoning-Focused Supervised Fine-Tuning", ICML 2025, https://arxiv.org/abs/2506.00772 (code: zihanghliu/LIFT).

For every linear weight W (m x n) inside the blocks (q, k, v, o, gate, up, down; not the head), take the rank
``filter_rank`` SVD approximation W_r and score each entry by |W_r[i, j]| (the approximation itself, not a
residual). The k = min((m + n) * lora_rank, m * n) entries with the largest score train: as many as a rank
``lora_rank`` LoRA adapter would have, so the density follows from the budget (about 5% on 7-8B models at rank 128,
far more on small models). Every ``update_interval`` optimizer steps the masks are recomputed from the current
weights; moments of entries that stay selected carry over, new ones start at zero. Norms, biases, embeddings and
the head are frozen (``--no_grad head`` in every released config).

The optimizer (``plan.optimizer_factory``) is a sparse AdamW (betas (0.9, 0.95), eps 1e-6) whose state per matrix is
three 1-D tensors of length k (indices and two moments), so optimizer memory is close to LoRA's. The gradient is
still computed densely (p.grad is full size), as in the paper.

No gradient clipping, as in the released training loop (it calls the optimizer straight after backward): the plan
carries a trainer callback that sets the trainer's ``max_grad_norm`` to 0 for the run (and puts it back at the end),
so ``train.max_grad_norm`` is ignored for LIFT. Set ``clip_grad: true`` to clip with ``train.max_grad_norm`` like
the other methods; clipping then sees only the selected entries (the gradient masks zero the rest).

Config keys that matter: ``lora_rank`` (budget), ``filter_rank`` (SVD rank), ``update_interval``, ``select``,
``clip_grad``.

Differs from the paper / released code:
- ``select`` exposes largest (the paper's text, our default) or smallest (a literal reading of the released
  ``lift_sparse`` branch) entries of |W_r|.
- weight decay really decays the selected entries (the released code applies it to an index copy, a no-op);
  with the released wd = 0 the two agree.
- the plan's gradient masks zero the gradient outside the selection. They are float tensors shared with the
  optimizer and updated in place at each refresh; ``trainable_params`` counts their ones (= sum of k).
- optimizer state bytes count the int32 index vector too (the released code keeps a bool mask on the CPU instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ftlab.config import ConfigError
from ftlab.methods._sparse_adam import SparseAdamW
from ftlab.methods.base import Plan, PlanContext
from ftlab.params import linear_weights

NAME = "lift"


@dataclass
class Config:
    lora_rank: int = 128  # budget: k = min((m+n)*lora_rank, m*n) entries per matrix (the README's recommendation)
    filter_rank: int = 128  # rank of the SVD approximation whose entry magnitudes pick the mask
    update_interval: int = 200  # recompute masks every N optimizer steps (script default; configs: 10-2000); 0: never
    select: str = "largest"  # largest | smallest entries of |W_r|
    svd: str = "full"  # full: torch.linalg.svd | lowrank: torch.svd_lowrank with q = 2 * filter_rank (faster)
    beta1: float = 0.9
    beta2: float = 0.95  # the training script's value
    eps: float = 1e-6
    clip_grad: bool = False  # False: no clipping (released code), train.max_grad_norm ignored; True: clip with it

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.filter_rank < 1:
            raise ConfigError("method.params.lora_rank and filter_rank must be >= 1")
        if self.update_interval < 0:
            raise ConfigError("method.params.update_interval must be >= 0")
        if self.select not in ("largest", "smallest"):
            raise ConfigError(f"method.params.select: {self.select!r} is not one of largest, smallest")
        if self.svd not in ("full", "lowrank"):
            raise ConfigError(f"method.params.svd: {self.svd!r} is not one of full, lowrank")


def budget(shape: tuple[int, ...] | torch.Size, lora_rank: int) -> int:
    """Entries a (m, n) matrix trains: as many as a rank-``lora_rank`` LoRA, at most all of them."""
    m, n = shape
    return min((m + n) * lora_rank, m * n)


@torch.no_grad()
def low_rank_magnitude(weight: torch.Tensor, rank: int, svd: str = "full") -> torch.Tensor:
    """|W_r|: entry magnitudes of the rank-``rank`` SVD approximation of ``weight`` (computed in fp32).

    Args:
        weight: a 2-D weight (out, in).
        rank: number of singular triplets kept.
        svd: ``full`` or ``lowrank`` (randomised, seeded so the result is reproducible).

    Returns:
        A float32 tensor of the weight's shape.
    """
    w = weight.detach().float()
    r = min(rank, *w.shape)
    if r == min(w.shape):
        return w.abs()  # full rank: W_r is W
    if svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r]).abs()  # (m, r) @ (r, n)
    with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(2 * r, *w.shape), niter=2)
    return ((u[:, :r] * s[:r]) @ v[:, :r].T).abs()


def select_entries(weight: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Sorted flat indices of the entries LIFT trains in ``weight`` under ``cfg``."""
    k = budget(weight.shape, cfg.lora_rank)
    if k >= weight.numel():
        return torch.arange(weight.numel(), device=weight.device)
    score = low_rank_magnitude(weight, cfg.filter_rank, cfg.svd).view(-1)
    return torch.topk(score, k, largest=cfg.select == "largest").indices.sort().values


def _factory(names: list[str], indices: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], cfg: Config):
    def factory(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
        params = dict(model.named_parameters())
        chosen = [params[n] for n in names]
        return SparseAdamW(
            chosen,
            indices={params[n]: indices[n] for n in names},
            select=lambda p: select_entries(p, cfg),
            update_interval=cfg.update_interval,
            grad_masks={params[n]: masks[n] for n in names if n in masks},
            lr=train_cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=train_cfg.weight_decay,
        )

    return factory


class NoGradClipping(TrainerCallback):
    """Turns the trainer's gradient clipping off for one run (``max_grad_norm`` 0), restoring the value at the end.

    The trainer reads ``args.max_grad_norm`` at every optimizer step, after ``on_train_begin``, so setting it there
    is enough; the callback only touches the trainer's own arguments object, never the run's ``TrainConfig``.
    """

    def __init__(self) -> None:
        self.saved: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.saved, args.max_grad_norm = args.max_grad_norm, 0.0

    def on_train_end(self, args, state, control, **kwargs):
        if self.saved is not None:
            args.max_grad_norm, self.saved = self.saved, None


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Pick each block matrix's top entries of its low-rank approximation; everything else is frozen.

    Args:
        model: a causal LM.
        cfg: LIFT settings.
        ctx: planning context (unused: LIFT needs no data to select).

    Returns:
        A plan training the block linear weights through gradient masks, with the sparse AdamW as its optimizer
        factory and (unless ``cfg.clip_grad``) a callback that turns gradient clipping off; ``info`` gives the
        budget, the density and whether gradients are clipped.
    """
    names = linear_weights(model)
    if not names:
        raise ConfigError("lift: the model has no linear weights inside numbered blocks")
    params = dict(model.named_parameters())
    indices = {n: select_entries(params[n], cfg) for n in names}
    masks = {}
    for n in names:
        p = params[n]
        # p's own dtype and device, so apply_plan's hook uses this very tensor and sees in-place refreshes.
        masks[n] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        masks[n].view(-1)[indices[n]] = 1
    k = sum(i.numel() for i in indices.values())
    total = sum(params[n].numel() for n in names)
    return Plan(
        trainable=set(names),
        grad_masks=masks,
        optimizer_factory=_factory(names, indices, masks, cfg),
        callbacks=[] if cfg.clip_grad else [NoGradClipping()],
        info={
            "lora_rank": cfg.lora_rank,
            "filter_rank": cfg.filter_rank,
            "update_interval": cfg.update_interval,
            "select": cfg.select,
            "clip_grad": cfg.clip_grad,
            "matrices": len(names),
            "trainable_params": k,
            "density": round(k / total, 6),
        },
    )
