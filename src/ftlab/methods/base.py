"""The method contract: a method looks at a model and returns a ``Plan``; ``train/`` applies every plan the same way.

A method module exposes ``NAME``, a ``Config`` dataclass and ``plan(model, cfg, ctx) -> Plan``. The plan is plain
data (which parameters train, which entries of them, an optional wrapped model, optimizer factory, callbacks and a
``finalize`` step), so it can be inspected and tested without training, and the training loop stays identical for
every method: a difference in forgetting then comes from the method, not from the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class PlanContext:
    """What a method may look at when planning.

    Attributes:
        stage: index of the training stage in a continual sequence (0 for the first); methods that re-draw their
            selection per stage (HFT) mix it into their seed.
        seed: the run's seed.
        train_dataset: the tokenized training data of this stage (``input_ids``/``labels``), for methods that need
            calibration batches or a warm-up phase.
        tokenizer: the model's tokenizer.
        train_cfg: the run's ``TrainConfig``.
        train_phase: ``train_phase(model, dataset, max_steps)`` runs the shared training loop on ``model`` with every
            parameter that requires grad (used by methods with an inner full fine-tuning phase, such as LT-SFT).
    """

    stage: int = 0
    seed: int = 0
    train_dataset: Any = None
    tokenizer: Any = None
    train_cfg: Any = None
    train_phase: Callable[..., None] | None = None


@dataclass
class Plan:
    """What trains, and how.

    Attributes:
        trainable: names (in ``model`` below, or the original model) of parameters that receive gradients.
        model: a wrapped model to train instead of the original (PEFT); None trains the original.
        grad_masks: name -> bool mask; gradient entries outside the mask are zeroed, so with zero weight decay
            those entries stay bit-identical.
        optimizer_factory: ``f(model, train_cfg) -> Optimizer`` for methods with their own optimizer state.
        callbacks: ``transformers.TrainerCallback`` instances (mask refresh and the like).
        finalize: ``f(model) -> model`` after training (merge adapters, apply sparse diffs).
        info: JSON-serialisable facts about the selection (densities, chosen modules) for the store.
        compute_loss_func: the method's own SFT loss, ``f(outputs, labels, num_items_in_batch) -> loss`` already
            scaled for gradient accumulation (transformers' ``compute_loss_func``); None keeps the trainer's.
    """

    trainable: set[str]
    model: nn.Module | None = None
    grad_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None
    callbacks: list[Any] = field(default_factory=list)
    finalize: Callable[[nn.Module], nn.Module] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    compute_loss_func: Callable[..., torch.Tensor] | None = None


def apply_plan(model: nn.Module, plan: Plan) -> tuple[nn.Module, list[Any]]:
    """Set ``requires_grad`` and install gradient-mask hooks as the plan says.

    Args:
        model: the original model.
        plan: the method's plan.

    Returns:
        ``(model_to_train, hook_handles)``; remove the handles after training.
    """
    target = plan.model if plan.model is not None else model
    names = {n for n, _ in target.named_parameters()}
    missing = sorted((plan.trainable | set(plan.grad_masks)) - names)
    if missing:
        raise ValueError(f"plan names parameters the model does not have: {missing[:5]}")
    handles = []
    for name, p in target.named_parameters():
        p.requires_grad_(name in plan.trainable)
        if name in plan.grad_masks and name in plan.trainable:
            mask = plan.grad_masks[name].to(device=p.device, dtype=p.dtype)
            if mask.shape != p.shape:
                raise ValueError(f"grad mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
            handles.append(p.register_hook(lambda g, m=mask: g * m))
    return target, handles


def trainable_count(model: nn.Module, plan: Plan) -> int:
    """Entries that can change: masked parameters count only their mask's ones."""
    target = plan.model if plan.model is not None else model
    total = 0
    for name, p in target.named_parameters():
        if name in plan.trainable:
            mask = plan.grad_masks.get(name)
            total += int(mask.count_nonzero()) if mask is not None else p.numel()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held in an optimizer's per-parameter state tensors (moments, step counters)."""
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
