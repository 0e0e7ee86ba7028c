"""Full fine-tuning: every parameter trains. The baseline every other method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ftlab.methods.base import Plan, PlanContext

NAME = "full"


@dataclass
class Config:
    pass


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Every parameter of ``model`` trains."""
    return Plan(trainable={n for n, _ in model.named_parameters()})
