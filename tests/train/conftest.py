"""Fixtures for the trainer adapters: a toy method with a gradient mask, registered for one test."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from ftlab.methods import METHODS, Plan

MASKED = "model.layers.0.mlp.down_proj.weight"  # trains, but only its first half of rows
OPEN = "model.layers.1.self_attn.o_proj.weight"  # trains fully


@dataclass
class _Config:
    pass


def _plan(model, cfg, ctx) -> Plan:
    w = dict(model.named_parameters())[MASKED]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[: w.shape[0] // 2] = True
    return Plan(trainable={MASKED, OPEN}, grad_masks={MASKED: mask}, info={"toy": True})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_method(monkeypatch) -> SimpleNamespace:
    """A method ``toy_masked`` that trains ``open`` and the first half of ``masked``'s rows; everything else frozen."""
    monkeypatch.setitem(METHODS, "toy_masked", SimpleNamespace(NAME="toy_masked", Config=_Config, plan=_plan))
    return SimpleNamespace(name="toy_masked", masked=MASKED, open=OPEN)
