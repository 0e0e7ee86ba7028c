"""Several processes: rank helpers, splitting work across ranks, and relaunching ``ftlab run`` under accelerate.

Every helper works without a process group (one process: rank 0 of 1, barriers do nothing), so library code calls
them unconditionally. A process group exists when the run was started by ``accelerate launch`` or ``torchrun`` and
something (accelerate's ``PartialState``, the trainer) initialised ``torch.distributed``.

``ftlab run`` with ``accelerate: path/to/config.yaml`` in the experiment re-executes itself as
``python -m accelerate.commands.launch --config_file PATH -m ftlab run ...`` (``relaunch_command``) unless it already
runs under a launcher (``launched``). accelerate's launcher turns the config file into environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_*``, ``ACCELERATE_USE_DEEPSPEED``, ...), which the ``Accelerator`` inside the
trainers reads: FSDP and DeepSpeed need nothing else from ftlab.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

# Set in the environment of a relaunched run, so it can never relaunch itself again.
LAUNCHED_ENV = "FTLAB_LAUNCHED"
# Variables a launcher (accelerate launch, torchrun) sets in every process it starts.
LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU")


def _group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the group (1 without one)."""
    dist = _group()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    dist = _group()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes the store, the summary, the report and runs edits."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    dist = _group()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    dist = _group()
    if not dist or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank_``'s contiguous share of ``n`` items: the first ``n % world`` ranks take one
    more, so shares differ by at most one and concatenating them in rank order gives the items back in order."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``torch.distributed.gather_object``); None on other ranks.
    Without a group: ``[obj]``."""
    dist = _group()
    if not dist or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def launched(env: dict[str, str] | None = None) -> bool:
    """True when this process was started by ``accelerate launch``, ``torchrun`` or an ftlab relaunch."""
    env = os.environ if env is None else env
    return bool(env.get(LAUNCHED_ENV)) or any(name in env for name in LAUNCHER_ENV)


def relaunch_command(config_file: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``ftlab <args>`` under ``accelerate launch`` with ``config_file``.

    ``python -m accelerate.commands.launch`` is the ``accelerate launch`` console script run by this interpreter, so
    it works where ``accelerate`` is not on PATH; ``-m ftlab`` makes each process run the ftlab package.
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "-m", "ftlab",
            *args]  # fmt: skip


def relaunch(config_file: str, args: Sequence[str]) -> int:
    """Run ``ftlab <args>`` under accelerate and wait; returns its exit code (the child's output is this one's)."""
    import subprocess

    env = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.run(relaunch_command(config_file, args), env=env, check=False).returncode
