"""LoRA through PEFT: the base weights stay frozen and bit-identical; only the low-rank adapters train."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from torch import nn

from ftlab.config import ConfigError
from ftlab.methods.base import Plan, PlanContext

NAME = "lora"


@dataclass
class Config:
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"  # PEFT's shorthand: every Linear except the output head
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead (rank-stabilised LoRA)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.params.r: {self.r} is below its minimum 1 (the adapter rank)")
        if not self.alpha > 0:
            raise ConfigError(f"method.params.alpha: {self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.params.dropout: {self.dropout} is not in [0, 1)")


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Wrap ``model`` in a PEFT LoRA model; ``finalize`` merges the adapters back into plain weights."""
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_cfg)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    return Plan(
        trainable=trainable,
        model=wrapped,
        finalize=lambda m: m.merge_and_unload(),
        info={"r": cfg.r, "alpha": cfg.alpha, "target_modules": cfg.target_modules},
    )
