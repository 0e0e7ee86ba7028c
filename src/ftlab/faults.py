"""Kill points for the crash-safety tests: ``FTLAB_KILL_AT=<phase>:<n>`` kills the process at the n-th passage.

ftlab promises that a run killed anywhere resumes to the same result. To test that promise deterministically inside
each phase, the code calls ``point(phase)`` at a few places where a kill would hurt most (in the middle of a write,
before a commit). With ``FTLAB_KILL_AT`` unset (always, outside tests) a point is one dictionary lookup.

Phases and where their point sits:

- ``data``: a stage's training records are being read (``recipes/run.py``);
- ``train``: the end of an optimizer step (the loss guard callback of ``train/sft.py``);
- ``checkpoint``: inside a trainer checkpoint, after the weights and optimizer are written, before the trainer state;
- ``save``: inside an atomic folder write (a saved model), filled but not yet renamed (``atomic.replace_dir``);
- ``write``: inside an atomic file write (summary, report, PNG, marker), written but not yet renamed;
- ``store``: inside a store write transaction, before its commit (``store.py``);
- ``eval``: a suite was scored, its result not yet stored;
- ``sweep``: a repair point's weights are loaded into the model, not yet scored;
- ``summary``: ``summary.json`` is written but the run is not yet marked done.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from ftlab.errors import InputError

KILL_ENV = "FTLAB_KILL_AT"
PHASES = ("data", "train", "checkpoint", "save", "write", "store", "eval", "sweep", "summary")

_passed: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    phase, _, n = spec.partition(":")
    return phase, int(n or 1)


def armed(phase: str) -> bool:
    """Whether ``FTLAB_KILL_AT`` names ``phase`` (so a caller may install a point it would not install otherwise)."""
    target = _target()
    return target is not None and target[0] == phase


def point(phase: str) -> None:
    """Kill this process with SIGKILL when ``FTLAB_KILL_AT`` is ``<phase>:<n>`` and this is the n-th passage."""
    target = _target()
    if target is None or target[0] != phase:
        return
    _passed[phase] = _passed.get(phase, 0) + 1
    if _passed[phase] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def instrument_trainer(trainer: Any) -> None:
    """Put the ``checkpoint`` point inside the trainer's checkpoint writing (only when that phase is armed): after
    the model, optimizer and scheduler files, before the RNG and trainer state files, so the checkpoint folder is
    left without its ``trainer_state.json`` as a kill at a bad moment would leave it."""
    if not armed("checkpoint"):
        return
    save = trainer._save_optimizer_and_scheduler

    def save_then_point(output_dir: str) -> None:
        save(output_dir)
        point("checkpoint")

    trainer._save_optimizer_and_scheduler = save_then_point


class NonFiniteLoss(InputError):
    """Training stopped because the loss (or a gradient) became NaN or infinite at an optimizer step.

    ``checkpoint`` is the last good checkpoint (the newest complete one, written before the bad step), or None.
    ``ftlab run`` adds the arm and stage (``where``) and records the failure in the store.
    """

    def __init__(self, what: str, value: float, step: int, checkpoint: str | None = None, where: str = "") -> None:
        self.what, self.value, self.step, self.checkpoint, self.where = what, value, step, checkpoint, where
        super().__init__()

    def __str__(self) -> str:
        value = "nan" if self.value != self.value else "inf" if self.value > 0 else "-inf"
        kept = (
            self.checkpoint or "none (no checkpoint was written before this step; the stage restarts from its start)"
        )
        return (
            f"{self.where + ': ' if self.where else ''}{self.what} became {value} at step {self.step}; "
            f"last good checkpoint: {kept}; rerun with a lower train.lr"
        )
