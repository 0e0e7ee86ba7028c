"""Preference fine-tuning (DPO) through TRL's DPOTrainer, with the method's Plan applied exactly as in ``train_sft``.

Paper: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS
2023 (arXiv 2305.18290). Defaults are TRL's (sigmoid loss, ``beta`` 0.1).

- ``preference`` records ``{"prompt", "chosen", "rejected"}`` become TRL's conversational format (a user turn and
  one assistant turn each) when the tokenizer has a chat template, plain text otherwise.
- Called directly, the reference is the model *as it was when this stage started* (a frozen copy; for PEFT methods
  TRL switches the adapters off instead) unless ``ref_model`` is given. In ``ftlab run`` the ``reference`` setting
  decides: ``base`` (default; the run's base model in every stage) or ``stage_start``.
- Inner training phases of a method (``PlanContext.train_phase``) run DPO on this stage's pairs too, and the
  calibration data a method sees (``PlanContext.train_dataset``) is SFT-tokenized ``prompt -> chosen`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from ftlab.config import ConfigError, TrainConfig
from ftlab.data.records import WHERE, DataError
from ftlab.train.reference import check_reference, train_against_reference
from ftlab.train.sft import TrainResult
from ftlab.train.stage import StageJob
from ftlab.train.trainer_args import base_trainer_kwargs, trainer_inputs


@dataclass
class DPOSettings:
    beta: float = 0.1  # how far from the reference the policy may move (higher: less); DPO paper / TRL default
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL loss names: sigmoid (DPO), ipo, ...
    label_smoothing: float = 0.0  # conservative DPO / robust DPO flip probability
    max_length: int | None = 512  # tokens of prompt + response; longer pairs are truncated (keep start)
    precompute_ref_log_probs: bool = False  # score the reference once up front, then drop it from memory
    reference: str = "base"  # in `ftlab run`: base (the run's base model) or stage_start (the model before this stage)

    def __post_init__(self) -> None:
        check_reference(self.reference, "dpo")
        if not self.beta > 0 or self.beta == float("inf"):  # `not >` also refuses NaN
            raise ConfigError(f"dpo.beta must be > 0 and finite, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


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


def train_dpo(
    job: StageJob, ref_model: nn.Module | None = None, callbacks: list[TrainerCallback] | None = None
) -> TrainResult:
    """Fine-tune ``job.model`` with DPO on ``preference`` records, with the job's method deciding what trains.

    Args:
        job: the policy (modified in place for non-PEFT methods), its tokenizer, the ``preference`` records, the
            method, training settings (``batch_size`` counts pairs), checkpoint folder, ``DPOSettings`` (default
            ``DPOSettings()``), stage index and resume flag.
        ref_model: the reference policy; None uses the model as it is now (before training).
        callbacks: extra trainer callbacks.

    Returns:
        A TrainResult; call ``final_model()`` for the plain trained model.
    """
    dpo = job.settings or DPOSettings()
    train, tokenizer = job.train, job.tokenizer
    set_seed(train.seed)
    dataset = dpo_dataset(job.records, tokenizer)

    def make_trainer(policy: nn.Module, ref: nn.Module | None, folder: Path, overrides: dict, opt: Any, cbs: list):
        args = dpo_config(train, dpo, folder, **overrides)
        return DPOTrainer(model=policy, ref_model=ref, args=args, **trainer_inputs(dataset, tokenizer, opt, cbs))

    return train_against_reference(job, make_trainer, lambda r: r["chosen"], ref_model=ref_model, callbacks=callbacks)


def train_stage(job: StageJob) -> TrainResult:
    """``ftlab run``'s DPO stage, anchored to the reference its ``reference`` setting names."""
    return train_dpo(job, ref_model=job.reference((job.settings or DPOSettings()).reference))
