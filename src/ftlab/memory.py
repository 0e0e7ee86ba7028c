"""The memory plan printed before training: weights, gradients, optimizer state, activations, against the device.

``plan_memory`` is a pure function of counts and byte sizes, so its arithmetic is tested with plain numbers.
``plan_for_model`` gathers those counts for a model reference without loading its weights (the model is built on
PyTorch's ``meta`` device from its config) and the method's settings; ``check_plan`` raises a one-line
``InputError`` when the total does not fit. ``ftlab train`` prints one plan, ``ftlab run`` one per arm.

What is counted, per method (``B`` = bytes per weight in the loaded dtype; AdamW keeps two moments per trained
entry, in the dtype of the entry it trains, as ``torch.optim.AdamW`` does):

- ``full``: every parameter trains: gradients ``N·B``, optimizer ``2·N·B``.
- ``lora``: only the adapters train, in fp32 (PEFT's default, also over a bf16 or quantized base): ``r·(in+out)``
  per adapted Linear; gradients and optimizer state cover the adapters only.
- ``hft``, ``freeze``, ``locft``: the parameters their plan selects (worked out on the meta model), densely.
- ``sparse``: its first phase is full fine-tuning, so its peak is ``full``'s.
- ``lift``: dense gradients on the selected matrices, optimizer state on ``min((m+n)·lora_rank, m·n)`` entries per
  matrix (two moments plus an int32 index each).
- quantized bases: 4-bit NF4 weights take half a byte per entry plus about 0.127 bits of double-quantized scales,
  8-bit one byte; every layer left unquantized is upcast to fp32 by PEFT's k-bit preparation.

Activations are an estimate: ``batch × seq × hidden × layers × ACTIVATION_BYTES`` at 16-bit compute (twice that in
fp32; after Korthikanti et al. 2022, attention through a fused kernel, so without the ``seq²`` score matrices), plus
the logits (``batch × seq × vocab``, fp32, kept twice for the loss). Gradient checkpointing keeps one hidden state
per layer and recomputes one layer at a time. Not counted: the CUDA context and allocator slack (about 0.5-1 GB on
a GPU), the data, and evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ftlab.errors import InputError

GB = 1e9
ACTIVATION_BYTES = 34  # bytes per token per hidden unit per layer at 16-bit compute (Korthikanti et al. 2022)
CHECKPOINT_BYTES = 2  # with gradient checkpointing: one 16-bit hidden state per token per layer
LOGIT_COPIES = 2  # fp32 logits and their softmax/gradient
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits per weight plus double-quantized absmax scales (QLoRA paper, section 2)
INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8: one byte per weight plus an fp32 scale per row (rows of ~4k)


@dataclass
class MemoryPlan:
    """Bytes needed to train, by part, and what the device has (``available`` None: unknown)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    available: float | None = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations (estimate)", self.activations),
            ("total", self.total),
        ]


def plan_memory(
    *,
    params: int,
    trainable: int,
    weight_bytes: float = 4,
    trainable_bytes: float | None = None,
    optimizer_entries: int | None = None,
    optimizer_extra: float = 0,
    quantized_params: int = 0,
    quantization: str = "none",
    batch: int = 1,
    seq: int = 512,
    hidden: int = 0,
    layers: int = 0,
    vocab: int = 0,
    compute_bytes: float = 2,
    gradient_checkpointing: bool = False,
    available: float | None = None,
    device: str = "cpu",
    notes: list[str] | None = None,
) -> MemoryPlan:
    """The memory plan of a training run, from counts (pure arithmetic; no model is touched).

    Args:
        params: parameters of the model (a tied head counted once).
        trainable: entries that receive gradients (dense gradient tensors, so a masked tensor counts whole).
        weight_bytes: bytes per weight as loaded (4 fp32, 2 bf16/fp16).
        trainable_bytes: bytes per trained entry, its gradient and each optimizer moment (default ``weight_bytes``;
            4 for LoRA's fp32 adapters).
        optimizer_entries: entries with AdamW state (default ``trainable``; LIFT's sparse selection is smaller).
        optimizer_extra: further optimizer bytes (LIFT's index tensors).
        quantized_params: parameters stored quantized (the Linear layers of the blocks) when ``quantization`` is on;
            the rest is counted in fp32 (PEFT's k-bit preparation upcasts them).
        quantization: none, 4bit or 8bit.
        batch, seq, hidden, layers, vocab: the activation shape.
        compute_bytes: bytes per activation value (2 for bf16/fp16 compute, 4 for fp32).
        gradient_checkpointing: keep one hidden state per layer and recompute.
        available: bytes the device has (None: unknown, always fits).
        device: the device's name, for messages.
        notes: assumptions to print with the plan.

    Returns:
        The ``MemoryPlan``.
    """
    if quantization == "none":
        weights = params * weight_bytes
    else:
        per = NF4_BYTES if quantization == "4bit" else INT8_BYTES
        weights = quantized_params * per + (params - quantized_params) * 4
    tb = weight_bytes if trainable_bytes is None else trainable_bytes
    gradients = trainable * tb
    entries = trainable if optimizer_entries is None else optimizer_entries
    optimizer = 2 * entries * tb + optimizer_extra
    scale = compute_bytes / 2
    tokens = batch * seq
    if gradient_checkpointing:
        per_token = hidden * (layers * CHECKPOINT_BYTES + ACTIVATION_BYTES) * scale
    else:
        per_token = hidden * layers * ACTIVATION_BYTES * scale
    activations = tokens * per_token + tokens * vocab * 4 * LOGIT_COPIES
    return MemoryPlan(weights, gradients, optimizer, activations, available, device, list(notes or []))


def check_plan(plan: MemoryPlan, where: str = "") -> None:
    """Raise a one-line ``InputError`` when the plan's total exceeds what the device has."""
    if plan.fits:
        return
    prefix = f"{where}: " if where else ""
    raise InputError(
        f"{prefix}training needs ~{plan.total / GB:.1f} GB, {plan.device} has {plan.available / GB:.1f} GB; "
        "try lora, load.quantization: 4bit, train.gradient_checkpointing: true, a smaller train.batch_size or "
        "data.max_length (train.memory_check: false skips this check)"
    )


def format_plan(plan: MemoryPlan, title: str = "memory plan") -> Any:
    """A rich table of the plan (GB per part, total against the device)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for name, value in plan.rows():
        table.add_row(name, f"{value / GB:.3f}")
    have = "unknown" if plan.available is None else f"{plan.available / GB:.1f}"
    table.add_row(f"available on {plan.device}", have)
    return table


def print_plan(plan: MemoryPlan, title: str = "memory plan") -> None:
    """Print the plan's table and notes on stderr."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(format_plan(plan, title))
    for note in plan.notes:
        console.print(f"  [dim]{note}[/]")


# ---------------------------------------------------------------- facts about a real model, without its weights
def available_bytes(device: str | None) -> tuple[float | None, str]:
    """``(bytes, name)`` of memory on the device training uses: free GPU memory (every GPU for ``auto``), or the
    machine's physical RAM on CPU."""
    import torch

    if device in (None, "none", "auto") and torch.cuda.is_available():
        if device == "auto":  # accelerate spreads the weights over every GPU
            free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
            return float(free), f"{torch.cuda.device_count()} GPU(s)"
        device = "cuda"
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return float(free), f"{torch.cuda.get_device_name(index)} ({device})"
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "cpu (physical RAM)"
    except (ValueError, OSError, AttributeError):
        return None, "cpu"


def meta_model(ref: str, settings: Any) -> Any:
    """The model of a reference built on the meta device from its config: shapes and names, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftlab.models import TINY_NAME, model_config, tiny_model

    if str(ref) == TINY_NAME:
        with torch.device("meta"):
            return tiny_model()
    ref = _weights_ref(ref)
    config = model_config(ref, settings)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)


def _weights_ref(ref: str) -> str:
    """The model whose config describes ``ref``: a diff folder's base (an adapter's base is found by model_config)."""
    try:
        from ftlab.diffs import diff_base, is_diff
    except ImportError:  # pragma: no cover - older layout
        return ref
    return diff_base(ref) if is_diff(ref) else ref


def _unique_params(model: Any) -> dict[str, Any]:
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def method_counts(model: Any, method: str, params: dict[str, Any], train: Any) -> dict[str, Any]:
    """Trainable entries and optimizer entries of a method on a (meta) model, as ``plan_memory`` keywords."""
    from torch import nn

    from ftlab.methods import method_config

    cfg = method_config(method, params)
    named = _unique_params(model)
    total = sum(p.numel() for p in named.values())
    if method in ("full", "sparse"):
        return {"trainable": total}
    if method == "lora":
        targets = cfg.target_modules
        n = 0
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
                continue
            if targets != "all-linear" and not any(name == t or name.endswith("." + t) for t in _as_list(targets)):
                continue
            n += cfg.r * (module.in_features + module.out_features)
        return {"trainable": n, "trainable_bytes": 4}
    if method == "lift":
        from ftlab.methods.lift import budget

        matrices = {k: p for k, p in named.items() if p.dim() == 2 and ".layers." in k}
        k = sum(budget(tuple(p.shape), cfg.lora_rank) for p in matrices.values())
        dense = sum(p.numel() for p in matrices.values())
        return {"trainable": dense, "optimizer_entries": k, "optimizer_extra": 4 * k}
    try:  # hft, freeze, locft, or a method added later: ask its plan which parameters train (names only)
        from ftlab.methods import PlanContext, get_method

        plan = get_method(method).plan(model, cfg, PlanContext(seed=getattr(train, "seed", 0), train_cfg=train))
        chosen = {n for n in plan.trainable if n in named}
        return {"trainable": sum(named[n].numel() for n in chosen)}
    except Exception:  # noqa: BLE001 - a plan that needs data or real weights: count every parameter (upper bound)
        return {"trainable": total, "notes": [f"{method}: trainable parameters counted as all of them (upper bound)"]}


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def plan_for_model(
    ref: str,
    settings: Any,
    method: str,
    params: dict[str, Any],
    train: Any,
    seq: int,
) -> MemoryPlan:
    """The memory plan of training ``ref`` (loaded as ``settings``) with a method, without loading weights.

    Args:
        ref: the model reference (hub id, folder, adapter or diff folder, ``tiny-test``).
        settings: its ``ModelSettings`` (dtype, quantization, device map).
        method: the method's name; ``params`` its settings.
        train: the ``TrainConfig`` (batch size, bf16, gradient checkpointing).
        seq: the longest training sequence (``data.max_length``).
    """
    import torch
    from torch import nn

    from ftlab.loading import resolve_dtype

    model = meta_model(ref, settings)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    named = _unique_params(model)
    total = sum(p.numel() for p in named.values())
    dtype = resolve_dtype(settings, config)
    weight_bytes = torch.empty((), dtype=dtype).element_size()
    quantized = 0
    if settings.quantized:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                quantized += module.weight.numel()
    counts = method_counts(model, method, params, train)
    notes = counts.pop("notes", [])
    # 16-bit activations for 16-bit weights, bf16 autocast or a quantized base; train.bf16 "auto" counts as fp32
    compute = 2 if (weight_bytes == 2 or getattr(train, "bf16", False) is True or settings.quantized) else 4
    available, device = available_bytes(settings.device_map)
    notes.append(
        f"{total / 1e6:.1f}M parameters in {str(dtype).replace('torch.', '')}"
        + (f", {quantized / 1e6:.1f}M of them {settings.quantization}" if settings.quantized else "")
        + f"; activations for batch {train.batch_size} x {seq} tokens at ~{ACTIVATION_BYTES} bytes per token per "
        f"hidden unit per layer ({'16' if compute == 2 else '32'}-bit)"
        + (", gradient checkpointing" if getattr(train, "gradient_checkpointing", False) else "")
    )
    return plan_memory(
        params=total,
        weight_bytes=weight_bytes,
        quantized_params=quantized,
        quantization=settings.quantization,
        batch=train.batch_size,
        seq=seq,
        hidden=getattr(text, "hidden_size", 0),
        layers=getattr(text, "num_hidden_layers", 0),
        vocab=getattr(text, "vocab_size", 0),
        compute_bytes=compute,
        gradient_checkpointing=getattr(train, "gradient_checkpointing", False),
        available=available,
        device=device,
        notes=notes,
        **counts,
    )


def plan_or_note(*args: Any, **kwargs: Any) -> MemoryPlan | None:
    """``plan_for_model``, or None (with a printed note) when the model's shape cannot be worked out without
    loading it (custom code, an unreadable config); a user error such as remote code still raises."""
    try:
        return plan_for_model(*args, **kwargs)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the plan is advice; training goes on without it
        from rich.console import Console

        Console(stderr=True).print(f"[dim]memory plan skipped: {type(err).__name__}: {err}[/]")
        return None


def announce(
    ref: str, settings: Any, method: str, params: dict[str, Any], train: Any, seq: int, title: str, where: str = ""
) -> MemoryPlan | None:
    """Work out, print and check the plan of one training run (``train.memory_check`` false: print only)."""
    plan = plan_or_note(ref, settings, method, params, train, seq)
    if plan is None:
        return None
    print_plan(plan, title)
    if getattr(train, "memory_check", True):
        check_plan(plan, where)
    return plan
