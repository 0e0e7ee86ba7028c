"""The trainer arguments every TRL adapter shares, built from our ``TrainConfig``.

SFT, GRPO and DPO take their optimizer, schedule, seed, logging and checkpoint settings from the same mapping, so
switching the objective does not silently change the loop around it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from ftlab.config import TrainConfig
from ftlab.trackers import trainer_location

# A trainer's checkpoint folder -> the folder its tensorboard logs go to (see ``tracker_kwargs``).
_TENSORBOARD_DIRS: dict[str, Path] = {}


def cpu_process_group() -> bool:
    """True for several processes (``torchrun``) on a machine without CUDA: they train as a gloo group on CPU.

    accelerate and transformers form that group only when told to use the CPU, so ``use_cpu`` is set then.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def trainer_inputs(dataset: Any, tokenizer: Any, optimizer: Any, callbacks: list[Any] | None) -> dict[str, Any]:
    """The keywords every TRL trainer takes besides its model and config: data, tokenizer, optimizer, callbacks (with
    the tensorboard callback when a trainer config asked for tensorboard)."""
    callbacks = [*(callbacks or []), *([StageTensorBoard()] if _TENSORBOARD_DIRS else [])]
    return dict(train_dataset=dataset, processing_class=tokenizer, optimizers=(optimizer, None), callbacks=callbacks)


def tracker_kwargs(train: TrainConfig, work_dir: str | Path) -> dict[str, Any]:
    """``report_to`` and ``run_name`` for the trackers ``train.report_to`` names (``ftlab.trackers`` places the runs).

    TensorBoard is kept out of ``report_to``: transformers would write its logs under the work folder, which is removed
    when the stage ends. The work folder is registered instead, and the ``StageTensorBoard`` callback that
    ``trainer_inputs`` adds writes to the folder ``ftlab.trackers.trainer_location`` gives.
    """
    key = _key(work_dir)
    _TENSORBOARD_DIRS.pop(key, None)
    location = trainer_location(train, work_dir) if train.report_to else None
    if location is None:
        return {"report_to": "none"}
    name, folder = location
    if "tensorboard" in train.report_to:
        _TENSORBOARD_DIRS[key] = folder
    others = [t for t in dict.fromkeys(train.report_to) if t != "tensorboard"]
    return {"report_to": others or "none", "run_name": name}


class StageTensorBoard(TensorBoardCallback):
    """transformers' tensorboard callback, writing to the folder registered for the trainer's work folder (a trainer
    whose config did not ask for tensorboard has none registered, and the callback writes nothing)."""

    def _init_summary_writer(self, args: Any, *_: Any) -> None:
        folder = _TENSORBOARD_DIRS.get(_key(args.output_dir))
        self.tb_writer = None if folder is None else self._SummaryWriter(log_dir=str(folder))


def _key(work_dir: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(work_dir)))


# Below this many parameters bf16 autocast does not pay: casting weights and activations costs more than the faster
# matmuls win (measured with bench/throughput.py; see docs/speed.md). ``train.bf16: auto`` stays fp32 there.
BF16_MIN_PARAMS = 20_000_000


def bf16_hardware() -> bool:
    """True where bf16 matmuls are native: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX tiles.

    A CPU without them emulates bf16 and runs slower than fp32, so ``train.bf16: auto`` stays off there.
    """
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None)]
    return any(bool(check()) for check in checks if callable(check))


def resolve_bf16(train: TrainConfig, model: Any = None) -> bool:
    """``train.bf16`` as a bool: ``auto`` is on where the hardware has native bf16 and the model is big enough.

    Args:
        train: the config (``bf16`` is true, false or ``auto``).
        model: the model to train; without one ``auto`` resolves to fp32 (DPO and GRPO, not benchmarked yet).
    """
    if isinstance(train.bf16, bool):
        return train.bf16
    if model is None or not bf16_hardware():
        return False
    return sum(p.numel() for p in model.parameters()) >= BF16_MIN_PARAMS


def set_threads() -> int:
    """Use one intra-op thread per physical core (hyper-threads slow matmuls down), unless ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads`` already chose fewer. Returns the thread count in use."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil ships with accelerate
        physical = None
    if physical and not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > physical:
        torch.set_num_threads(physical)
    return torch.get_num_threads()


def speed_kwargs(train: TrainConfig, model: Any = None) -> dict[str, Any]:
    """The speed switches (see docs/speed.md), as ``TrainingArguments`` keywords.

    * ``bf16``: autocast to bfloat16 (weights, gradients and optimizer state stay fp32), from ``resolve_bf16``.
    * ``train_sampling_strategy``: ``group_by_length`` (``train.group_by_length``) batches records of similar length
      inside random mega-batches of at most a quarter of the data (transformers' ``LengthGroupedSampler``), so less
      padding is computed; each record still attends only to itself (right padding with an attention mask).
    * ``optim``: fused AdamW (transformers' default from torch 2.8; named here so an older default does not apply).
    * ``include_num_input_tokens_seen``: counts real (non-padding) tokens, for tokens/s in the logs.
    """
    set_threads()
    grouped = train.group_by_length and model is not None  # DPO/GRPO rows have no input_ids to measure
    return dict(
        bf16=resolve_bf16(train, model),
        train_sampling_strategy="group_by_length" if grouped else "random",
        optim="adamw_torch_fused",
        include_num_input_tokens_seen="non_padding",
    )


class EpochSeededLengthSampler(LengthGroupedSampler):
    """transformers' ``LengthGroupedSampler`` with an order drawn from ``seed + epoch``, not the global RNG.

    The stock sampler draws each epoch's mega-batches from the global generator, so a run resumed from a checkpoint
    (which skips the finished epochs without drawing them) sees other batches than the uninterrupted run. Seeding each
    epoch the way accelerate's seedable random sampler does makes the order a function of (seed, epoch): a resumed
    run trains on the same batches, and ``skip_first_batches`` skips the ones already seen.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204 - a Sampler's iterator
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def seed_length_grouping(trainer: Any) -> None:
    """Make a trainer's length-grouped sampler resumable (``EpochSeededLengthSampler``); other samplers are left."""
    build = trainer._get_train_sampler

    def sampler(*args: Any, **kwargs: Any) -> Any:
        found = build(*args, **kwargs)
        if type(found) is LengthGroupedSampler:
            return EpochSeededLengthSampler(found.batch_size, found.lengths, trainer.args.seed)
        return found

    trainer._get_train_sampler = sampler


def base_trainer_kwargs(train: TrainConfig, work_dir: str | Path, model: Any = None) -> dict[str, Any]:
    """``TrainingArguments`` keywords from our TrainConfig (CPU-friendly: no workers; reporting to ``report_to``).

    Args:
        train: optimizer and schedule settings.
        work_dir: the trainer's output (checkpoint) folder.
        model: the model to train, given by the SFT adapter: ``bf16: auto`` and ``group_by_length`` apply only then.

    Returns:
        Keyword arguments accepted by every TRL config class (SFTConfig, GRPOConfig, DPOConfig).
    """
    speed = speed_kwargs(train, model)
    # transformers refuses bf16 on a machine without CUDA unless told to train on the CPU
    use_cpu = cpu_process_group() or (speed["bf16"] and not torch.cuda.is_available())
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
        **speed,
        activation_checkpointing=train.gradient_checkpointing,  # TRL turns it on by default; small models do without
        **tracker_kwargs(train, work_dir),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps host-to-GPU copies
        use_cpu=use_cpu,
    )
