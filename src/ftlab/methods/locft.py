"""LocFT-BF: localized, breadth-first fine-tuning for knowledge edits.

Paper: Yang et al., "Fine-tuning Done Right in Model Editing", ICLR 2026, https://arxiv.org/abs/2509.22072
(code: ICT-STAR/LocFT).

Only one module location trains: by default ``mlp.down_proj.weight`` of one block (the Llama-3-8B and Qwen2.5-7B
configs), matched by exact dotted names (block 2 never matches blocks 20-29). Training is breadth-first: shuffled
mini-batch epochs over all edits, which is what the shared trainer does with ``train.epochs`` and
``train.batch_size`` (the paper: batch 100, 25 epochs, Adam lr 5e-4, wd 0). On top of it, as in the released code:

- a mini-batch whose token-mean loss on the target tokens is below ``skip_loss_below`` (1e-2) makes no update;
- training stops after an epoch whose mean batch loss is below ``stop_loss_below`` (1e-2).

Both are done by a callback that measures each micro-batch's loss with a forward hook on the model, and by the
optimizer from ``plan.optimizer_factory`` (AdamW with the stage's lr and weight decay, which skips the step).

Default block (``layer: -1``): the released configs' choice scaled to the model's depth, in integer arithmetic:
``layer = n_layer * 22 // 32`` (Llama-3-8B: block 22 of 32); Qwen2 models use ``n_layer * 6 // 28`` (Qwen2.5-7B:
block 6 of 28) and Mistral ``n_layer * 23 // 32``. SmolLM2-135M (30 blocks, Llama) gets block 20; the 4-block test
model block 2.

Differs from the paper / released code:
- EOS after each target comes from the data pipeline (the chat template's end-of-turn token), not from this method;
- a skipped batch still advances the trainer's step counter and lr schedule (the paper uses a constant lr);
- Mistral's released config trains the whole block; here it needs ``modules: ["*"]`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ftlab.config import ConfigError
from ftlab.methods.base import Plan, PlanContext
from ftlab.methods.freeze import select
from ftlab.params import n_layers

NAME = "locft"

# (numerator, denominator): the released configs' block over their model's depth.
_DEPTH_RULE = {"qwen2": (6, 28), "mistral": (23, 32)}
_DEFAULT_RULE = (22, 32)  # Llama-3-8B-Instruct


@dataclass
class Config:
    layer: int = -1  # block that trains; -1: the released configs' depth rule (see module docstring)
    modules: list[str] = field(default_factory=lambda: ["mlp.down_proj.weight"])  # patterns inside that block
    skip_loss_below: float = 1e-2  # no update for a batch whose loss is below this (0: never skip)
    stop_loss_below: float = 1e-2  # stop after an epoch whose mean batch loss is below this (0: never stop)


def default_layer(n_layer: int, model_type: str | None) -> int:
    """The block LocFT tunes by default for a model of ``n_layer`` blocks and the given ``model_type``."""
    num, den = _DEPTH_RULE.get(model_type or "", _DEFAULT_RULE)
    return n_layer * num // den


class _LossMeter:
    """Token-mean loss of the micro-batches since the last optimizer step, and of every batch in the epoch."""

    def __init__(self) -> None:
        self.total, self.tokens = 0.0, 0
        self.epoch: list[float] = []
        self.skipped = 0

    def add(self, total: float, tokens: int) -> None:
        self.total += total
        self.tokens += tokens

    def take(self) -> float | None:
        """Loss of the batch just finished (None when nothing was measured); also logged for the epoch."""
        if not self.tokens:
            return None
        loss = self.total / self.tokens
        self.total, self.tokens = 0.0, 0
        self.epoch.append(loss)
        return loss


def _measure(meter: _LossMeter):
    @torch.no_grad()
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:
            return
        log_probs, mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if log_probs is not None and mask is not None:  # TRL's fused LM head: per-token log-probs, no logits
            meter.add(float(-log_probs[mask].sum()), int(mask.sum()))
            return
        logits, labels = getattr(output, "logits", None), kwargs.get("labels")
        if logits is None or labels is None:
            return
        shifted = labels[:, 1:]  # (B, T-1): token t predicts label t+1
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), reduction="sum")
        meter.add(float(total), int((shifted != -100).sum()))

    return hook


class _SkippingAdamW(torch.optim.AdamW):
    """AdamW that makes no update when the batch just measured has a loss below ``skip_below``."""

    def __init__(self, params: Any, meter: _LossMeter, skip_below: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.meter, self.skip_below = meter, skip_below

    def step(self, closure: Any = None) -> Any:
        loss = self.meter.take()
        if loss is not None and loss < self.skip_below:
            self.meter.skipped += 1
            return None
        return super().step(closure)


class _BreadthFirst(TrainerCallback):
    """Hooks the loss meter onto the model for the run; stops after an epoch with a low mean loss."""

    def __init__(self, meter: _LossMeter, stop_below: float, info: dict[str, Any]):
        self.meter, self.stop_below, self.info = meter, stop_below, info
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = model.register_forward_hook(_measure(self.meter), with_kwargs=True)

    def on_epoch_end(self, args, state, control, **kwargs):
        losses, self.meter.epoch = self.meter.epoch, []
        if losses and sum(losses) / len(losses) < self.stop_below:
            control.should_training_stop = True
            self.info["stopped_after_epoch"] = int(round(state.epoch or 0))

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
        self.info["skipped_batches"] = self.meter.skipped


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Train only the chosen module(s) of one block, breadth-first, with LocFT's skip and stop rules.

    Args:
        model: the model to edit.
        cfg: location and thresholds.
        ctx: planning context (unused).

    Returns:
        A plan with the located parameters trainable, a skipping AdamW and the breadth-first callback.
    """
    n = n_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layer = default_layer(n, model_type) if cfg.layer == -1 else cfg.layer
    if not 0 <= layer < n:
        raise ConfigError(f"method.params.layer: {layer} is outside 0-{n - 1} (the model has {n} blocks)")
    trainable = select(model, [layer], cfg.modules, [], "method.params.")
    meter = _LossMeter()
    info: dict[str, Any] = {"layer": layer, "modules": cfg.modules, "trainable": sorted(trainable)}

    def factory(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
        params = [p for name, p in model.named_parameters() if name in trainable]
        return _SkippingAdamW(params, meter, cfg.skip_loss_below, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    return Plan(
        trainable=trainable,
        optimizer_factory=factory,
        callbacks=[_BreadthFirst(meter, cfg.stop_loss_below, info)],
        info=info,
    )
