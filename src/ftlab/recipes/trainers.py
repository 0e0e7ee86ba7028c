"""The objectives ``ftlab run`` can train a stage with: ``TRAINERS``, name -> ``Trainer``.

Each objective lives in one module of ``ftlab.train`` that has a settings dataclass (or none) and a
``train_stage(job: StageJob) -> TrainResult`` function. Registering it here is one line; the experiment config
checks a stage's and an arm's ``settings`` against the registered dataclass before anything trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftlab.train import dpo, grpo, sft
from ftlab.train.sft import TrainResult
from ftlab.train.stage import StageJob


@dataclass(frozen=True)
class Trainer:
    """One registered objective.

    Attributes:
        train: trains one arm through one stage.
        settings: the dataclass a stage's/arm's ``settings`` mapping fills (None: the objective takes none).
    """

    train: Callable[[StageJob], TrainResult]
    settings: type[Any] | None = None


TRAINERS: dict[str, Trainer] = {
    "sft": Trainer(sft.train_stage),
    "dpo": Trainer(dpo.train_stage, dpo.DPOSettings),
    "grpo": Trainer(grpo.train_stage, grpo.GRPOSettings),
}
