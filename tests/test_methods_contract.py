"""Every registered method: its plan is valid, a short train changes only planned entries, and the count is right."""

from __future__ import annotations

import pytest
import torch
from _util import record_plans

from ftlab.methods import METHODS

# Small settings so every method selects a strict subset of the tiny model and finishes in about a second.
TINY_PARAMS = {
    "lora": {"r": 4},
    "lift": {"lora_rank": 2, "filter_rank": 4},
    "sparse": {"proportion": 0.05, "full_ft_steps": 2},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def planned_count(target: torch.nn.Module, plan) -> int:
    count = 0
    for name, p in target.named_parameters():
        if name in plan.trainable:
            mask = plan.grad_masks.get(name)
            count += int((mask != 0).sum()) if mask is not None else p.numel()
    return count


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, train_tiny, monkeypatch):
    plans = record_plans(monkeypatch, METHODS[name])
    base, model, result = train_tiny(name, TINY_PARAMS.get(name, {}))  # 3 steps at lr 1e-2, batch 4
    (plan,) = plans

    # the plan is valid: names exist, masks are 0/1 of the right shape and belong to trainable parameters
    target = plan.model if plan.model is not None else model
    params = dict(target.named_parameters())
    assert plan.trainable and plan.trainable <= set(params)
    for key, mask in plan.grad_masks.items():
        assert key in plan.trainable and mask.shape == params[key].shape
        assert bool(((mask == 0) | (mask == 1)).all())
    assert result.trainable_params == planned_count(target, plan)

    if name == "lora":
        wrapped = target.state_dict()
        for key, value in base.items():
            twin = key.replace(".weight", ".base_layer.weight")
            found = [k for k in wrapped if k.endswith(twin)] or [k for k in wrapped if k.endswith(key)]
            assert torch.equal(wrapped[found[0]], value), key  # base weights bit-identical
        assert all(bool(v.abs().sum() > 0) for k, v in wrapped.items() if "lora_B" in k)  # adapters moved
        return

    now = model.state_dict()
    moved = 0
    for key, value in base.items():
        diff = now[key] != value
        if key not in plan.trainable:
            assert not bool(diff.any()), f"{name}: frozen {key} changed"
        elif key in plan.grad_masks:
            assert not bool((diff & (plan.grad_masks[key] == 0)).any()), f"{name}: {key} changed outside its mask"
        moved += int(diff.sum())
    assert moved > 0
