"""Preference fine-tuning (DPO) through TRL's DPOTrainer, with the method's Plan applied exactly as in ``train_sft``.

Paper: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS
2023 (arXiv 2305.18290). Defaults are TRL's (sigmoid loss, ``beta`` 0.1).

- ``preference`` records ``{"prompt", "chosen", "rejected"}`` become TRL's conversational format (a user turn and
  one assistant turn each) when the tokenizer has a chat template, plain text otherwise.
- The reference is the model *as it was when this stage started* (a frozen copy; for PEFT methods TRL switches the
  adapters off instead); pass ``ref_model`` to use another one (e.g. the original base in a continual run).
- Inner training phases of a method (``PlanContext.train_phase``) run DPO on this stage's pairs too, and the
  calibration data a method sees (``PlanContext.train_dataset``) is SFT-tokenized ``prompt -> chosen`` pairs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from ftlab.config import MethodConfig, TrainConfig
from ftlab.data.records import WHERE, DataError
from ftlab.data.tokenize import sft_dataset
from ftlab.methods import method_config
from ftlab.train.sft import TrainResult, prepare_method, run_trainer
from ftlab.train.trainer_args import base_trainer_kwargs


@dataclass
class DPOSettings:
    beta: float = 0.1  # how far from the reference the policy may move (higher: less); DPO paper / TRL default
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL loss names: sigmoid (DPO), ipo, ...
    label_smoothing: float = 0.0  # conservative DPO / robust DPO flip probability
    max_length: int | None = 512  # tokens of prompt + response; longer pairs are truncated (keep start)
    precompute_ref_log_probs: bool = False  # score the reference once up front, then drop it from memory

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")


def dpo_dataset(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Rows in TRL's preference format (conversational when the tokenizer has a chat template).

    Args:
        records: ``preference`` records.
        tokenizer: the model's tokenizer.

    Returns:
        A dataset with ``prompt``, ``chosen`` and ``rejected`` columns.
    """
    chat = tokenizer.chat_template is not None
    rows = []
    for i, r in enumerate(records):
        where = r.get(WHERE, f"record {i}")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in r]
        if missing:
            raise DataError(f"{where}: DPO needs preference records; missing field '{missing[0]}'")
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
            )
        else:
            rows.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    if not rows:
        raise DataError("DPO: no training records")
    return Dataset.from_list(rows)


def dpo_config(train: TrainConfig, dpo: DPOSettings, work_dir: str | Path, **overrides: Any) -> DPOConfig:
    """TRL DPOConfig from our settings."""
    kwargs = base_trainer_kwargs(train, work_dir)
    kwargs.update(
        beta=dpo.beta,
        loss_type=list(dpo.loss_type),
        label_smoothing=dpo.label_smoothing,
        max_length=dpo.max_length,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def train_dpo(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    method: MethodConfig,
    train: TrainConfig,
    work_dir: str | Path,
    dpo: DPOSettings | None = None,
    stage: int = 0,
    ref_model: nn.Module | None = None,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` with DPO on ``preference`` records, with the named method deciding what trains.

    Args:
        model: the policy (modified in place for non-PEFT methods).
        tokenizer: its tokenizer.
        records: ``preference`` records.
        method: method name and params.
        train: optimizer and schedule settings (``batch_size`` counts pairs).
        work_dir: folder for trainer checkpoints.
        dpo: DPO settings (default ``DPOSettings()``).
        stage: index of the stage in a continual run.
        ref_model: the reference policy; None uses the model as it is now (before training).
        callbacks: extra trainer callbacks.
        resume: continue from the newest checkpoint in ``work_dir`` when there is one.

    Returns:
        A TrainResult; call ``final_model()`` for the plain trained model.
    """
    dpo = dpo or DPOSettings()
    work_dir = Path(work_dir)
    set_seed(train.seed)
    dataset = dpo_dataset(records, tokenizer)
    method_config(method.name, method.params)  # a bad setting fails before the reference is copied
    # Copied before planning: a method's plan may already train the model (inner phases).
    ref = ref_model if ref_model is not None else _frozen_copy(model)

    def phase(inner: nn.Module, _dataset: Any, max_steps: int) -> None:
        args = dpo_config(train, dpo, work_dir / "phase", max_steps=max_steps, save_strategy="no")
        DPOTrainer(model=inner, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer).train()

    calib = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]
    calib_ds = sft_dataset(calib, "completion", tokenizer, truncate=True)
    plan, target, handles, optimizer = prepare_method(model, tokenizer, method, train, stage, calib_ds, phase)
    if ref_model is None and is_peft_model(target):
        ref = None  # TRL then scores the reference with the adapters switched off: the same model, no copy
    trainer = DPOTrainer(
        model=target,
        ref_model=ref,
        args=dpo_config(train, dpo, work_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[*plan.callbacks, *(callbacks or [])],
    )
    return run_trainer(trainer, model, target, plan, handles, work_dir, resume)
