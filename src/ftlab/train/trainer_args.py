"""The trainer arguments every TRL adapter shares, built from our ``TrainConfig``.

SFT, GRPO and DPO take their optimizer, schedule, seed, logging and checkpoint settings from the same mapping, so
switching the objective does not silently change the loop around it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ftlab.config import TrainConfig


def cpu_process_group() -> bool:
    """True for several processes (``torchrun``) on a machine without CUDA: they train as a gloo group on CPU.

    accelerate and transformers form that group only when told to use the CPU, so ``use_cpu`` is set then.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def trainer_inputs(dataset: Any, tokenizer: Any, optimizer: Any, callbacks: list[Any] | None) -> dict[str, Any]:
    """The keywords every TRL trainer takes besides its model and config: data, tokenizer, optimizer, callbacks."""
    return dict(
        train_dataset=dataset, processing_class=tokenizer, optimizers=(optimizer, None), callbacks=callbacks or []
    )


def base_trainer_kwargs(train: TrainConfig, work_dir: str | Path) -> dict[str, Any]:
    """``TrainingArguments`` keywords from our TrainConfig (CPU-friendly: no workers, no reporting).

    Args:
        train: optimizer and schedule settings.
        work_dir: the trainer's output (checkpoint) folder.

    Returns:
        Keyword arguments accepted by every TRL config class (SFTConfig, GRPOConfig, DPOConfig).
    """
    return dict(
        output_dir=str(work_dir),
        learning_rate=train.lr,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # transformers reads a value below 1 as a ratio of the total steps
        lr_scheduler_type=train.scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=train.save_steps if train.save_steps > 0 else 500,
        save_total_limit=1,
        bf16=train.bf16,
        activation_checkpointing=train.gradient_checkpointing,  # TRL turns it on by default; small models do without
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps host-to-GPU copies
        use_cpu=cpu_process_group(),
    )
