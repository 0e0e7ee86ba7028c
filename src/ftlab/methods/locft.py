"""LocFT-BF: localized, breadth-first fine-tuning for knowledge edits.

Paper: Yang et al., "Fine-tuning Done Right in Model Editing", ICLR 2026, https://arxiv.org/abs/2509.22072
(code: ICT-STAR/LocFT).

Only one module location trains: by default ``mlp.down_proj.weight`` of one block (the Llama-3-8B and Qwen2.5-7B
configs), matched by exact dotted names (block 2 never matches blocks 20-29). Training is breadth-first: shuffled
mini-batch epochs over all edits, which is what the shared trainer does with ``train.epochs`` and
``train.batch_size`` (the paper: batch 100, 25 epochs, Adam lr 5e-4, wd 0). On top of it, as in the released code:

- a mini-batch whose loss on the target tokens is below ``skip_loss_below`` (1e-2) makes no update;
- training stops after an epoch whose mean loss is below ``stop_loss_below`` (1e-2).

The loss behind both decisions is the released code's: each sample's mean cross-entropy over its own target tokens,
averaged over the samples of the batch (not the mean over all target tokens of the batch, which weights long
targets more). A batch is everything one optimizer step sees (all its gradient-accumulation micro-batches); the
epoch loss is the mean over every sample of the epoch (the released code's batch-size-weighted batch average).
Both are measured by a forward hook on the model (a callback installs it) at the weights the batch is trained
from, and the optimizer from ``plan.optimizer_factory`` (AdamW with the stage's lr and weight decay) skips the step.

Default block (``layer: -1``): the released configs' choice scaled to the model's depth, in integer arithmetic:
``layer = n_layer * 22 // 32`` (Llama-3-8B: block 22 of 32); Qwen2 models use ``n_layer * 6 // 28`` (Qwen2.5-7B:
block 6 of 28) and Mistral ``n_layer * 23 // 32``. SmolLM2-135M (30 blocks, Llama) gets block 20; the 4-block test
model block 2.

Differs from the paper / released code:
- under SFT the gradient comes from the released per-sample average (``sample_mean_loss``, handed to the trainer
  as the plan's ``compute_loss_func``); under DPO and GRPO the objective's own loss is kept;
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
    skip_loss_below: float = 1e-2  # no update for a batch whose per-sample mean loss is below this (0: never skip)
    stop_loss_below: float = 1e-2  # stop after an epoch whose per-sample mean loss is below this (0: never stop)

    def __post_init__(self) -> None:
        if self.layer < -1:
            raise ConfigError(f"method.params.layer: {self.layer} is neither -1 (the depth rule) nor a block index")
        for name in ("skip_loss_below", "stop_loss_below"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"method.params.{name}: {getattr(self, name)} must be >= 0")


def default_layer(n_layer: int, model_type: str | None) -> int:
    """The block LocFT tunes by default for a model of ``n_layer`` blocks and the given ``model_type``."""
    num, den = _DEPTH_RULE.get(model_type or "", _DEFAULT_RULE)
    return n_layer * num // den


def per_sample_loss(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sample's mean negative log-likelihood over its own target tokens.

    Args:
        log_probs: (B, N) log-probabilities of the next-token labels (any value where ``mask`` is False).
        mask: (B, N) True on target tokens.

    Returns:
        (B_with_targets,) losses of the samples that have at least one target token (the others are left out).
    """
    mask = mask.bool()
    counts = mask.sum(1)
    nll = -(log_probs.float() * mask).sum(1)
    keep = counts > 0
    return nll[keep] / counts[keep]


def _label_log_probs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """(log-probabilities of the next-token labels, target mask), both (B, T-1): logits t predict label t+1."""
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=ignore_index, reduction="none"
    )
    return -nll.view_as(shifted), mask


def sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """LocFT's batch loss: per-sample token-mean cross-entropy on the target tokens, averaged over the samples.

    Args:
        logits: (B, T, V) next-token logits.
        labels: (B, T) token ids, ``ignore_index`` on prompt and padding (position t is predicted by logits t - 1).
        ignore_index: the label of positions that are not scored.

    Returns:
        A scalar (differentiable); 0 when no sample has a target token.
    """
    losses = per_sample_loss(*_label_log_probs(logits, labels, ignore_index))
    return losses.mean() if losses.numel() else logits.sum() * 0.0


class _LossMeter:
    """Per-sample losses of the micro-batches since the last optimizer step, and running sums over the epoch."""

    def __init__(self) -> None:
        self.batch: list[torch.Tensor] = []
        self.epoch_sum, self.epoch_count = 0.0, 0
        self.skipped = 0

    def add(self, losses: torch.Tensor) -> None:
        """Record the per-sample losses (one per sample with target tokens) of one micro-batch."""
        if losses.numel():
            self.batch.append(losses.detach().float().cpu())

    def take(self) -> float | None:
        """Loss of the batch just finished, the mean of its per-sample losses (None when nothing was measured)."""
        if not self.batch:
            return None
        losses = torch.cat(self.batch)
        self.batch = []
        self.epoch_sum += float(losses.sum())
        self.epoch_count += losses.numel()
        return float(losses.mean())

    def take_epoch(self) -> float | None:
        """Mean per-sample loss over the epoch so far (None when nothing was measured); starts a new epoch."""
        total, n = self.epoch_sum, self.epoch_count
        self.epoch_sum, self.epoch_count = 0.0, 0
        return total / n if n else None


def _measure(meter: _LossMeter):
    @torch.no_grad()
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:
            return
        log_probs, mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if log_probs is not None and mask is not None:  # TRL's fused LM head: per-token log-probs, no logits
            meter.add(per_sample_loss(log_probs, mask))
            return
        logits, labels = getattr(output, "logits", None), kwargs.get("labels")
        if logits is None or labels is None:
            return
        meter.add(per_sample_loss(*_label_log_probs(logits, labels)))

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
        loss = self.meter.take_epoch()
        if loss is not None and loss < self.stop_below:
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

    accum = max(getattr(ctx.train_cfg, "grad_accum", 1) or 1, 1)

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """The released objective: per-sample token-mean loss averaged over the batch (scaled for accumulation)."""
        return sample_mean_loss(outputs.logits, labels) / accum

    return Plan(
        trainable=trainable,
        optimizer_factory=factory,
        callbacks=[_BreadthFirst(meter, cfg.stop_loss_below, info)],
        info=info,
        compute_loss_func=loss,
    )
