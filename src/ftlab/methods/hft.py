"""HFT, Half Fine-Tuning: in every stage a random half of each block trains and the other half stays frozen.

Paper: Hui et al., "HFT: Half Fine-Tuning for Large Language Models", ACL 2025, https://arxiv.org/abs/2404.18466

Selection is "category-level" (docs/methods.md, "HFT"), independently per block:

- attention: 2 of the 4 matrices {q, k, v, o}_proj train;
- feed-forward: the block indices are shuffled and split in two halves; in one half 2 of {gate, up, down}_proj train,
  in the other half 1 of them (with an odd number of blocks the extra block goes to the 2-of-3 half, as the SSU
  reimplementation does, so on average a little over 1.5 of 3 train);
- norms: 1 of the 2 block norms (input / post-attention) trains;
- embeddings, the output head and the final norm train by default (``train_embeddings``, ``train_head``,
  ``train_final_norm``) when the model has separate input and output embeddings, as the paper's Llama-2 models do.
  With tied embeddings the head *is* the embedding matrix, so it trains if either flag is on; left unset
  (``None``), both flags are off for a tied model (see "Differs from the paper").

A bias follows its matrix; other block parameters (e.g. Qwen3's q_norm/k_norm) stay frozen. Frozen parameters get
``requires_grad=False`` before the optimizer is built, which is where the speed-up comes from: autograd skips their
weight gradients and the optimizer keeps no state for them.
The draw is seeded by ``seed`` (default: the run's seed) mixed with ``ctx.stage``, so each stage of a continual run
re-draws its half and a rerun reproduces it; ``plan.info["mask"]`` records it. With grouped-query attention k/v are
smaller than q/o, so "2 of 4 matrices" is not half the attention parameters: ``info`` logs the real fractions.

Config keys that matter: ``seed``, ``redraw`` (``stage``, the paper's default, or ``epoch``: a new half at the start
of every epoch, an option the reference marks as unconfirmed; it needs an optimizer that holds every candidate
parameter, so it uses a plain AdamW built here, with the Trainer's default settings).

Differs from the paper: no official code exists; this follows the reference's reading of it (secondary sources).
The paper's models have untied embeddings that hold 2-4% of their weights. Small models often tie the input
embedding to the output head, and then that one matrix is a large share of the model (SmolLM2-135M: a 49k x 576
matrix, 21% of the weights) and both the first and the last layer. Training it, the trainable share is 60% rather
than half and a CPU step costs 0.80 of full fine-tuning's (``bench/methods.py``, row ``hft-embed``); frozen, the
share is 40% and the step 0.71 (row ``hft``). So the default (``None``) trains embeddings and head on untied models, as
the paper does, and freezes a tied one; set ``train_embeddings: true`` to train it anyway. ``plan.info`` records
which happened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ftlab.config import ConfigError
from ftlab.methods.base import Plan, PlanContext
from ftlab.params import in_layer_name, layer_of, matches, n_layers, param_count

NAME = "hft"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class Config:
    seed: int | None = None  # seed of the random half; None uses the run's seed (mixed with the stage either way)
    redraw: str = "stage"  # stage: one half per stage (paper) | epoch: a new half at every epoch start
    # Input embeddings / output head train (the paper's default; its ablation froze them and lost). None: train them
    # unless the model ties them into one matrix (then both stay frozen; see the module notes).
    train_embeddings: bool | None = None
    train_head: bool | None = None
    train_final_norm: bool = True  # norm after the last block trains (unspecified in the paper; SSU trains it)

    def __post_init__(self) -> None:
        if self.redraw not in ("stage", "epoch"):
            raise ConfigError(f"method.params.redraw: {self.redraw!r} is not one of stage, epoch")


def draw_mask(n_layer: int, seed: int, stage: int, epoch: int = 0) -> dict[int, dict[str, list[str]]]:
    """The modules that train in each block, for one seed, stage (and epoch).

    Args:
        n_layer: number of transformer blocks.
        seed: base seed.
        stage: stage index, mixed into the seed so each stage re-draws.
        epoch: epoch index (only for ``redraw="epoch"``; 0 otherwise).

    Returns:
        ``{block: {"attn": [...], "mlp": [...], "norm": [...]}}`` with module names (``q_proj``...).
    """
    rng = random.Random(f"hft:{seed}:{stage}:{epoch}")  # str seeds hash deterministically across processes
    order = list(range(n_layer))
    rng.shuffle(order)
    two_of_three = set(order[: (n_layer + 1) // 2])
    mask = {}
    for i in range(n_layer):
        mask[i] = {
            "attn": sorted(rng.sample(ATTENTION, 2)),
            "mlp": sorted(rng.sample(FEED_FORWARD, 2 if i in two_of_three else 1)),
            "norm": sorted(rng.sample(NORMS, 1)),
        }
    return mask


def _unit(name: str) -> str | None:
    """The HFT module kind a block parameter belongs to (``q_proj``, ``input_layernorm``...), or None."""
    rel = in_layer_name(name)
    for unit in (*ATTENTION, *FEED_FORWARD, *NORMS):
        if matches(rel, unit):
            return unit
    return None


def _io_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and output head modules (None where the model has none)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return emb, head


def tied_embeddings(model: nn.Module) -> bool:
    """True when the output head and the input embedding are one tensor."""
    emb, head = _io_embeddings(model)
    if emb is None or head is None:
        return False
    return any(p is q for p in emb.parameters() for q in head.parameters())


def _outside_names(model: nn.Module, cfg: Config) -> set[str]:
    """Parameters outside the blocks that train by the config (embeddings, head, final norm)."""
    keep: set[int] = set()
    emb, head = _io_embeddings(model)
    default = not tied_embeddings(model)
    if (default if cfg.train_embeddings is None else cfg.train_embeddings) and emb is not None:
        keep |= {id(p) for p in emb.parameters()}
    if (default if cfg.train_head is None else cfg.train_head) and head is not None:
        keep |= {id(p) for p in head.parameters()}
    out = set()
    for name, p in model.named_parameters():
        if layer_of(name) is not None:
            continue
        if id(p) in keep or (cfg.train_final_norm and matches(name, "*norm*")):
            out.add(name)
    return out


def _embeddings_trained(model: nn.Module, trainable: set[str]) -> bool:
    emb, _ = _io_embeddings(model)
    ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    return any(id(p) in ids and n in trainable for n, p in model.named_parameters())


def _selected(model: nn.Module, mask: dict[int, dict[str, list[str]]], outside: set[str]) -> set[str]:
    chosen = set(outside)
    for name, _ in model.named_parameters():
        i = layer_of(name)
        if i is None:
            continue
        unit = _unit(name)
        if unit is not None and any(unit in units for units in mask[i].values()):
            chosen.add(name)
    return chosen


def _check_layout(model: nn.Module) -> None:
    units = {_unit(n) for n, _ in model.named_parameters() if layer_of(n) is not None}
    missing = sorted(set(ATTENTION + FEED_FORWARD + NORMS) - units)
    if missing:
        raise ConfigError(
            f"hft needs Llama-style block modules ({', '.join(ATTENTION + FEED_FORWARD + NORMS)}); "
            f"this model lacks {', '.join(missing)}"
        )


def _fractions(model: nn.Module, trainable: set[str]) -> dict[str, float]:
    names = {n for n, _ in model.named_parameters()}
    blocks = {n for n in names if layer_of(n) is not None}
    attn = {n for n in blocks if _unit(n) in ATTENTION}
    ffn = {n for n in blocks if _unit(n) in FEED_FORWARD}

    def frac(group: set[str]) -> float:
        total = param_count(model, group)
        return round(param_count(model, group & trainable) / total, 6) if total else 0.0

    return {
        "trainable_fraction": frac(names),
        "block_fraction": frac(blocks),
        "attention_fraction": frac(attn),
        "ffn_fraction": frac(ffn),
    }


class _EpochRedraw(TrainerCallback):
    """Re-draws the half at the start of every epoch after the first (``redraw="epoch"``)."""

    def __init__(self, model: nn.Module, seed: int, stage: int, outside: set[str], info: dict[str, Any]):
        self.model, self.seed, self.stage, self.outside, self.info = model, seed, stage, outside, info
        self.epoch = -1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1
        epoch = self.epoch
        if epoch == 0:
            return  # the plan's own draw
        mask = draw_mask(n_layers(self.model), self.seed, self.stage, epoch)
        chosen = _selected(self.model, mask, self.outside)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in chosen)
            if name not in chosen:
                p.grad = None  # AdamW skips parameters without a gradient: frozen entries stay put
        self.info.setdefault("epoch_masks", {})[str(epoch)] = {str(i): m for i, m in mask.items()}


def _adamw_factory(candidates: set[str]):
    """AdamW over every parameter that may train in some epoch, grouped like the Trainer's (no decay on norms/bias)."""

    def factory(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if name in candidates:
                (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": train_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=train_cfg.lr)

    return factory


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Draw this stage's half of every block and freeze the rest.

    Args:
        model: a causal LM with Llama-style block modules.
        cfg: HFT settings.
        ctx: planning context; ``ctx.stage`` and ``ctx.seed`` seed the draw.

    Returns:
        A plan whose ``trainable`` is the drawn half (plus embeddings/head/final norm by config) and whose ``info``
        holds the mask and the real trainable fractions.
    """
    _check_layout(model)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    mask = draw_mask(n_layers(model), seed, ctx.stage)
    outside = _outside_names(model, cfg)
    trainable = _selected(model, mask, outside)
    info: dict[str, Any] = {
        "seed": seed,
        "stage": ctx.stage,
        "redraw": cfg.redraw,
        "mask": {str(i): m for i, m in mask.items()},
        "trainable_params": param_count(model, trainable),
        "tied_embeddings": tied_embeddings(model),
        "embeddings_trained": _embeddings_trained(model, trainable),
        **_fractions(model, trainable),
    }
    if cfg.redraw == "stage":
        return Plan(trainable=trainable, info=info)
    candidates = outside | {n for n, _ in model.named_parameters() if layer_of(n) is not None and _unit(n) is not None}
    return Plan(
        trainable=trainable,
        optimizer_factory=_adamw_factory(candidates),
        callbacks=[_EpochRedraw(model, seed, ctx.stage, outside, info)],
        info=info,
    )
