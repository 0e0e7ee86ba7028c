"""The skeleton DPO and GRPO share: train a policy against a frozen reference, with a method's Plan applied.

Both objectives keep a reference model (DPO's implicit reward, GRPO's KL term). ``train_against_reference`` runs
the steps in one order for both:

1. check the method's settings (before copying anything);
2. freeze a copy of the model *as it is now* as the reference, unless one is given or none is needed; this happens
   before planning, because a method's plan may already train the model (inner phases such as LT-SFT's phase 1);
3. build the calibration set a method sees (``prompt -> answer`` pairs, SFT-tokenized);
4. plan and apply the method (``prepare_method``), running inner phases with the same objective;
5. for a PEFT model with no explicit reference, drop the copy: TRL scores the reference with the adapters off;
6. build the trainer and train it to the end of the stage (``run_trainer``).

Which model is the reference is the ``reference`` setting of DPO and GRPO: ``stage_start`` (the model when this
stage starts) or ``base`` (the run's base model, the anchor the RFT-forgetting paper uses across stages); a caller
with the base model at hand passes it as ``ref_model``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.utils import is_peft_model
from torch import nn
from transformers import TrainerCallback

from ftlab.config import ConfigError
from ftlab.data.tokenize import sft_dataset
from ftlab.methods import method_config
from ftlab.train.sft import TrainResult, prepare_method, run_trainer
from ftlab.train.stage import StageJob

REFERENCES = ("base", "stage_start")

# (model, reference or None, work folder, overrides of the trainer's config, optimizer, callbacks) -> a TRL trainer
MakeTrainer = Callable[[nn.Module, nn.Module | None, Path, dict[str, Any], Any, list[TrainerCallback]], Any]


def check_reference(reference: str, where: str) -> None:
    """Raise a ConfigError unless ``reference`` names a reference model ftlab knows."""
    if reference not in REFERENCES:
        raise ConfigError(f"{where}.reference: {reference!r} is not one of {', '.join(REFERENCES)}")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every parameter frozen."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def train_against_reference(
    job: StageJob,
    make_trainer: MakeTrainer,
    answer_of: Callable[[dict[str, Any]], str],
    ref_model: nn.Module | None = None,
    needs_reference: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``job.model`` with a reference-based objective (see the module docstring for the steps).

    Args:
        job: the model, tokenizer, records, method, training settings, work folder, stage index and resume flag.
        make_trainer: builds the objective's TRL trainer.
        answer_of: the reference answer of a record, for the method's calibration set.
        ref_model: the reference; None freezes a copy of ``job.model`` as it is now.
        needs_reference: False when the objective runs without a reference (GRPO with ``beta`` 0).
        callbacks: extra trainer callbacks.
        info: facts to store with the result, beside the plan's own.

    Returns:
        The TrainResult.
    """
    model, tokenizer, work_dir = job.model, job.tokenizer, Path(job.work_dir)
    method_config(job.method.name, job.method.params)  # a bad setting fails before the reference is copied
    ref = ref_model if ref_model is not None or not needs_reference else frozen_copy(model)

    def phase(inner: nn.Module, _dataset: Any, max_steps: int) -> None:
        overrides = {"max_steps": max_steps, "save_strategy": "no"}
        make_trainer(inner, ref, work_dir / "phase", overrides, None, []).train()

    calib = [{"prompt": r["prompt"], "completion": answer_of(r)} for r in job.records]
    calib_ds = sft_dataset(calib, "completion", tokenizer, truncate=True)
    plan, target, handles, optimizer = prepare_method(
        model, tokenizer, job.method, job.train, job.stage, calib_ds, phase
    )
    if ref_model is None and is_peft_model(target):
        ref = None  # TRL then scores the reference with the adapters switched off: the same model, no copy
    trainer = make_trainer(target, ref, work_dir, {}, optimizer, [*plan.callbacks, *(callbacks or [])])
    merged = None if info is None else {**plan.info, **info}
    return run_trainer(trainer, model, target, plan, handles, work_dir, job.resume, merged)
