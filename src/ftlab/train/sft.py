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

from ftlab import faults
from ftlab.atomic import disk_full, is_disk_full, write_json
from ftlab.config import MethodConfig, TrainConfig
from ftlab.data.records import first_answer
from ftlab.data.tokenize import sft_dataset
from ftlab.loading import ModelSettings, check_method, is_quantized
from ftlab.methods import PlanContext, apply_plan, get_method, method_config, optimizer_state_bytes, trainable_count
from ftlab.train.stage import StageJob
from ftlab.train.trainer_args import base_trainer_kwargs, seed_length_grouping, trainer_inputs


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


def sft_config(
    train: TrainConfig, work_dir: str | Path, max_length: int | None = None, model: Any = None, **overrides: Any
) -> SFTConfig:
    """TRL SFTConfig from our TrainConfig (CPU-friendly: no workers, no reporting; the speed switches of
    ``trainer_args.speed_kwargs`` for ``model``)."""
    kwargs: dict[str, Any] = base_trainer_kwargs(train, work_dir, model)
    kwargs.update(max_length=max_length, packing=False, disable_tqdm=False)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _train_phase(train: TrainConfig, work_dir: Path, tokenizer: PreTrainedTokenizerBase, max_length: int | None):
    """The shared loop, for methods with an inner fine-tuning phase (every parameter that requires grad trains)."""

    def run(model: nn.Module, dataset: Dataset, max_steps: int) -> None:
        args = sft_config(train, work_dir / "phase", max_length, model, max_steps=max_steps, save_strategy="no")
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
        A model loaded 4-bit or 8-bit (``ftlab.loading``) is prepared with PEFT's ``prepare_model_for_kbit_training``
        (its unquantized layers in fp32, input gradients on) and takes only ``lora`` (QLoRA); other methods raise a
        ``ConfigError``.
    """
    cfg = method_config(method.name, method.params)
    if is_quantized(model):  # QLoRA: only adapters train over k-bit weights (configs refuse the rest earlier)
        from peft import prepare_model_for_kbit_training

        bits = "8bit" if getattr(model, "is_loaded_in_8bit", False) else "4bit"
        check_method(ModelSettings(quantization=bits), method.name)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    ctx = PlanContext(
        stage=stage, seed=train.seed, train_dataset=dataset, tokenizer=tokenizer, train_cfg=train, train_phase=phase
    )
    plan = get_method(method.name).plan(model, cfg, ctx)
    if is_quantized(model):
        plan.finalize = None  # the adapter stays a PeftModel: merging would round it into the k-bit weights
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
    args = sft_config(train, work_dir, max_length, target, **evals)
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
    guard = LossGuard(trainer)  # a NaN/inf loss stops the stage before the step; see faults.NonFiniteLoss
    if checkpoint is not None:
        scale_lr_after_failure(trainer, work_dir)
    faults.instrument_trainer(trainer)
    seed_length_grouping(trainer)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except faults.NonFiniteLoss as err:
        raise guard.record(err, work_dir) from None
    except Exception as err:
        if not is_disk_full(err):
            raise
        drop_incomplete_checkpoints(work_dir)  # the previous complete checkpoint stays, untouched
        raise disk_full(Path(work_dir) / f"checkpoint-{trainer.state.global_step}", err) from None
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


def drop_incomplete_checkpoints(work_dir: str | Path) -> None:
    """Remove checkpoint folders without a readable trainer state (cut off by a kill or a full disk)."""
    import shutil

    complete = latest_checkpoint(work_dir)
    for path in Path(work_dir).glob("checkpoint-*"):
        if complete is None or int(path.name.split("-")[-1]) > int(Path(complete).name.split("-")[-1]):
            shutil.rmtree(path, ignore_errors=True)


FAILURE_FILE = "ftlab-failed.json"


class LossGuard(TrainerCallback):
    """Stops training at the first optimizer step whose loss, or one of whose gradients, is NaN or infinite.

    The trainer's ``training_step`` is wrapped to look at each loss; the check runs before the optimizer step, so the
    weights never take a non-finite update and no checkpoint is written after it: the newest checkpoint in the work
    folder is the last good one. It also holds the ``train`` kill point of ``ftlab.faults``.
    """

    def __init__(self, trainer: Any) -> None:
        self.bad: tuple[str, float] | None = None
        self.lr = trainer.args.learning_rate
        step = trainer.training_step

        def checked(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if self.bad is None and not bool(torch.isfinite(loss.detach()).all()):
                self.bad = ("loss", float(loss.detach().float().mean()))
            return loss

        trainer.training_step = checked
        trainer.add_callback(self)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.bad is None and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                self.bad = ("gradient", float("nan"))
        if self.bad is not None:
            raise faults.NonFiniteLoss(self.bad[0], self.bad[1], state.global_step + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        faults.point("train")

    def record(self, err: Any, work_dir: str | Path) -> Any:
        """Name the last good checkpoint in ``err`` and leave a note beside it (step, value, learning rate) that a
        rerun with another ``train.lr`` reads (``scale_lr_after_failure``)."""
        drop_incomplete_checkpoints(work_dir)
        err.checkpoint = latest_checkpoint(work_dir)
        if err.checkpoint is not None:
            note = {"step": err.step, "what": err.what, "value": str(err.value), "lr": self.lr}
            write_json(Path(work_dir) / FAILURE_FILE, {**note, "checkpoint": err.checkpoint})
        return err


def scale_lr_after_failure(trainer: Any, work_dir: str | Path) -> None:
    """After a NaN stop, a rerun with another ``train.lr`` resumes from the last good checkpoint with the new rate:
    the checkpoint's optimizer and schedule are restored (moments, step), then every rate is scaled by new / old."""
    note = Path(work_dir) / FAILURE_FILE
    try:
        old = float(json.loads(note.read_text())["lr"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    factor = trainer.args.learning_rate / old if old else 1.0
    if factor != 1.0:
        trainer.add_callback(_ScaleLR(factor))


class _ScaleLR(TrainerCallback):
    """Multiplies the restored optimizer's and scheduler's learning rates by ``factor`` as training begins (after
    transformers loaded them from the checkpoint)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:  # fmt: skip
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        for group in getattr(optimizer, "param_groups", []):
            group["lr"] *= self.factor
            if "initial_lr" in group:
                group["initial_lr"] *= self.factor


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
