"""Supervised fine-tuning through TRL's SFTTrainer, with the method's Plan applied identically for every method.

Run from Python::

    from ftlab.config import MethodConfig, TrainConfig
    result = train_sft(model, tok, dataset, MethodConfig("lora"), TrainConfig(max_steps=20), "out/work")
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from ftlab.config import MethodConfig, TrainConfig
from ftlab.data.records import first_answer
from ftlab.data.tokenize import sft_dataset
from ftlab.methods import PlanContext, apply_plan, get_method, method_config, optimizer_state_bytes, trainable_count
from ftlab.train.stage import StageJob
from ftlab.train.trainer_args import base_trainer_kwargs, trainer_inputs


@dataclass
class TrainResult:
    """What a training stage produced.

    Attributes:
        model: the model as trained (a PEFT model for LoRA); ``final_model()`` gives the finalized plain model.
        trainable_params: entries that could change.
        optimizer_state_bytes: bytes of optimizer state at the end of training.
        train_seconds: wall time of ``trainer.train``.
        steps: optimizer steps taken.
        log_history: the trainer's log records (loss per logging step).
        plan_info: the method's own facts about its selection.
        finalize: the plan's finalize step (merge adapters, apply diffs), run once by ``final_model``.
    """

    model: nn.Module
    trainable_params: int
    optimizer_state_bytes: int
    train_seconds: float
    steps: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    plan_info: dict[str, Any] = field(default_factory=dict)
    finalize: Any = None
    _final: nn.Module | None = None

    def final_model(self) -> nn.Module:
        """The finalized model in eval mode with gradients off (for LoRA: merged; the PEFT wrapper is consumed)."""
        if self._final is None:
            final = self.finalize(self.model) if self.finalize else self.model
            for p in final.parameters():
                p.requires_grad_(False)
            self._final = final.eval()
        return self._final


def sft_config(train: TrainConfig, work_dir: str | Path, max_length: int | None = None, **overrides: Any) -> SFTConfig:
    """TRL SFTConfig from our TrainConfig (CPU-friendly: no workers, no reporting, fp32 unless bf16)."""
    kwargs: dict[str, Any] = base_trainer_kwargs(train, work_dir)
    kwargs.update(max_length=max_length, packing=False, disable_tqdm=False)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _train_phase(train: TrainConfig, work_dir: Path, tokenizer: PreTrainedTokenizerBase, max_length: int | None):
    """The shared loop, for methods with an inner fine-tuning phase (every parameter that requires grad trains)."""

    def run(model: nn.Module, dataset: Dataset, max_steps: int) -> None:
        args = sft_config(train, work_dir / "phase", max_length, max_steps=max_steps, save_strategy="no")
        SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

    return run


def prepare_method(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: MethodConfig,
    train: TrainConfig,
    stage: int,
    dataset: Any,
    phase: Any,
) -> tuple[Any, nn.Module, list[Any], torch.optim.Optimizer | None]:
    """Plan a method on a model and apply the plan; shared by the SFT, DPO and GRPO adapters.

    Args:
        model: the model to train.
        tokenizer: its tokenizer.
        method: method name and settings.
        train: optimizer and schedule settings.
        stage: stage index (methods may re-draw per stage).
        dataset: SFT-tokenized data a method may calibrate on.
        phase: ``(model, dataset, max_steps) -> None`` for methods with an inner training phase, run with the
            calling trainer's objective.

    Returns:
        ``(plan, target, handles, optimizer)``: the optimizer is the plan's own, or None for the trainer's default.
    """
    cfg = method_config(method.name, method.params)
    ctx = PlanContext(
        stage=stage, seed=train.seed, train_dataset=dataset, tokenizer=tokenizer, train_cfg=train, train_phase=phase
    )
    plan = get_method(method.name).plan(model, cfg, ctx)
    target, handles = apply_plan(model, plan)
    optimizer = plan.optimizer_factory(target, train) if plan.optimizer_factory else None
    return plan, target, handles, optimizer


def train_sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    method: MethodConfig,
    train: TrainConfig,
    work_dir: str | Path,
    stage: int = 0,
    max_length: int | None = None,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    data_collator: Any = None,
    eval_dataset: Dataset | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on a tokenized dataset with the named method.

    Args:
        model: the model to train (modified in place for non-PEFT methods).
        tokenizer: its tokenizer.
        dataset: rows with ``input_ids`` and ``labels`` (``ftlab.data.sft_dataset``).
        method: method name and params.
        train: optimizer and schedule settings.
        work_dir: folder for trainer checkpoints.
        stage: index of the stage in a continual run (methods may re-draw selections per stage).
        max_length: longest sequence (already enforced when tokenizing).
        resume: continue from the newest checkpoint in ``work_dir`` when there is one.
        callbacks: extra trainer callbacks.
        data_collator: replaces TRL's default collator (e.g. Masked Thought's input masking).
        eval_dataset: tokenized validation rows; when given, the loss on them is logged (``eval_loss``) every
            ``train.logging_steps`` steps.

    Returns:
        A TrainResult; call ``final_model()`` for the plain trained model.
    """
    work_dir = Path(work_dir)
    set_seed(train.seed)
    phase = _train_phase(train, work_dir, tokenizer, max_length)
    plan, target, handles, optimizer = prepare_method(model, tokenizer, method, train, stage, dataset, phase)
    evals = dict(eval_strategy="steps", eval_steps=train.logging_steps) if eval_dataset is not None else {}
    args = sft_config(train, work_dir, max_length, **evals)
    inputs = trainer_inputs(dataset, tokenizer, optimizer, [*plan.callbacks, *(callbacks or [])])
    trainer = SFTTrainer(
        model=target, args=args, data_collator=data_collator, compute_loss_func=plan.compute_loss_func,
        eval_dataset=eval_dataset, **inputs,
    )  # fmt: skip
    return run_trainer(trainer, model, target, plan, handles, work_dir, resume)


def run_trainer(
    trainer: Any,
    model: nn.Module,
    target: nn.Module,
    plan: Any,
    handles: list[Any],
    work_dir: str | Path,
    resume: bool,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train with a built TRL trainer (resuming from the newest complete checkpoint when asked) and collect the result.

    Shared by the SFT, DPO and GRPO adapters so every objective ends a stage the same way: gradient-mask hooks
    removed, optimizer state measured, the trained model in eval mode.

    Args:
        trainer: the TRL trainer, already holding ``target``.
        model: the original model (for counting planned entries).
        target: the model the trainer trains (a PEFT wrapper for LoRA).
        plan: the method's Plan.
        handles: hook handles from ``apply_plan``.
        work_dir: the trainer's checkpoint folder.
        resume: continue from the newest complete checkpoint in ``work_dir``.
        info: facts to store beside the plan's own (default: the plan's info).

    Returns:
        The TrainResult.
    """
    checkpoint = latest_checkpoint(work_dir) if resume else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    opt = trainer.optimizer
    target.eval()
    return TrainResult(
        model=target,
        trainable_params=trainable_count(model, plan),
        optimizer_state_bytes=optimizer_state_bytes(getattr(opt, "optimizer", opt)),
        train_seconds=seconds,
        steps=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
        plan_info=dict(plan.info) if info is None else info,
        finalize=plan.finalize,
    )


def latest_checkpoint(work_dir: str | Path) -> str | None:
    """Newest complete checkpoint: the trainer writes ``trainer_state.json`` last, so a run killed while saving
    leaves a folder without it (or with it cut short), and the previous checkpoint is the one to resume from."""
    found = sorted(Path(work_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(path)
    return None


def train_stage(job: StageJob) -> TrainResult:
    """``ftlab run``'s SFT stage: tokenize the records (a verifiable record learns its reference answer), apply
    Masked Thought when the arm asks for it, and train."""
    from ftlab.data.masked_thought import MaskedThoughtCollator

    records, fmt = job.records, job.fmt
    if fmt == "verifiable":
        records = [{**r, "completion": first_answer(r["answer"])} for r in records]
        fmt = "completion"
    dataset = sft_dataset(records, fmt, job.tokenizer, job.max_length)
    collator, callbacks = None, []
    if job.masked_thought is not None:
        collator = MaskedThoughtCollator(job.tokenizer, seed=job.seed, **vars(job.masked_thought))
        callbacks = [collator.callback()]
    return train_sft(
        job.model, job.tokenizer, dataset, job.method, job.train, job.work_dir, stage=job.stage,
        max_length=job.max_length, resume=job.resume, callbacks=callbacks, data_collator=collator,
    )  # fmt: skip
