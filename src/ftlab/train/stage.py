"""What ``ftlab run`` hands a trainer for one stage of one arm: ``StageJob``.

Every objective (``sft``, ``dpo``, ``grpo``) exposes ``train_stage(job) -> TrainResult``; the run loop builds the job
and looks the objective up in ``ftlab.recipes.trainers.TRAINERS``. A new objective is one module here with a
settings dataclass and a ``train_stage`` function, plus one line in that registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ftlab.config import MethodConfig, TrainConfig


@dataclass
class StageJob:
    """One arm's training in one stage.

    Attributes:
        model: the model as the stage starts (trained in place for non-PEFT methods).
        tokenizer: its tokenizer.
        records: the stage's records after mixing and replay.
        method: the arm's method.
        train: optimizer and schedule settings.
        work_dir: folder for the trainer's checkpoints.
        settings: the objective's settings (an instance of its registered settings dataclass; None: defaults).
        stage: 0-based index of the stage in the run.
        fmt: the records' format (``chat``, ``completion``, ``preference`` or ``verifiable``).
        max_length: token cap of a tokenized record.
        masked_thought: Masked Thought settings for SFT (None: off).
        resume: continue from the newest complete checkpoint in ``work_dir``.
        load_base: loads the run's base model (for ``reference: base`` in later stages).
        seed: the experiment's seed.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    records: list[dict[str, Any]]
    method: MethodConfig
    train: TrainConfig
    work_dir: Path
    settings: Any = None
    stage: int = 0
    fmt: str = ""
    max_length: int = 512
    masked_thought: Any = None
    resume: bool = False
    load_base: Callable[[], nn.Module] | None = None
    seed: int = 0

    def reference(self, which: str) -> nn.Module | None:
        """The reference model a ``reference`` setting names, or None for "the model as this stage starts".

        In the first stage the base *is* the model as the stage starts, so no second copy is loaded.
        """
        if which != "base" or self.stage == 0 or self.load_base is None:
            return None
        ref = self.load_base().eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref
