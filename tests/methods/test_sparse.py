"""LT-SFT: phase 1 picks the K most-changed entries, the model resets, and only those entries train; sparse diffs."""

import pytest
import torch
from _util import record_plans
from safetensors.torch import save_file

from ftlab.config import TrainConfig
from ftlab.methods import sparse
from ftlab.methods.base import PlanContext
from ftlab.models import tiny_model


def fake_phase(deltas):
    """A phase 1 that adds known changes to every parameter that requires grad."""

    def run(model, dataset, max_steps):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(deltas[name])

    return run


def test_selects_the_top_k_changes_and_resets_to_the_snapshot():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    ctx = PlanContext(train_dataset=[{}], train_phase=fake_phase(deltas), train_cfg=TrainConfig(max_steps=5))
    plan = sparse.plan(model, sparse.Config(num_params=100), ctx)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # reset to the snapshot
    maskable = [n for n in deltas if "norm" not in n]
    flat = torch.cat([deltas[n].abs().view(-1) for n in maskable])
    threshold = torch.topk(flat, 100).values[-1]
    for n in maskable:
        want = deltas[n].abs() >= threshold
        assert torch.equal(plan.grad_masks.get(n, torch.zeros_like(want)), want), n
    assert plan.info["selected"] == 100 and plan.info["full_ft_steps"] == 5
    assert not any("norm" in n for n in plan.trainable)  # norms are frozen, as in the released scripts


def test_needs_a_training_phase():
    with pytest.raises(ValueError, match="train_phase"):
        sparse.plan(tiny_model(), sparse.Config(), PlanContext())


def test_training_moves_only_selected_entries(train_tiny, changed, monkeypatch):
    plans = record_plans(monkeypatch, sparse)
    base, model, result = train_tiny("sparse", {"proportion": 0.05, "full_ft_steps": 3})
    (plan,) = plans
    moved = changed(base, model)
    assert moved and set(moved) <= plan.trainable
    for name, m in moved.items():
        assert not bool((m & ~plan.grad_masks[name]).any()), name  # nothing outside the selection moved
    selected = sum(int(m.sum()) for m in plan.grad_masks.values())
    assert result.trainable_params == selected == plan.info["selected"]
    assert sum(int(m.sum()) for m in moved.values()) > 0.9 * selected
    diff = sparse.sparse_diff(base, model.state_dict())
    assert sum(d.indices.numel() for d in diff.values()) <= selected


def test_diffs_save_load_and_compose(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}
    d1 = {"a": torch.zeros(4, 5), "b": torch.zeros(7)}
    d1["a"][1, 2], d1["b"][3], d1["b"][4] = 0.5, -0.25, 1e-9  # 1e-9 is under the threshold
    d2 = {"a": torch.zeros(4, 5), "b": torch.zeros(7)}
    d2["a"][1, 2], d2["a"][0, 0] = 0.125, 2.0
    diff1 = sparse.sparse_diff(base, {k: base[k] + d1[k] for k in base})
    diff2 = sparse.sparse_diff(base, {k: base[k] + d2[k] for k in base})
    assert diff1["a"].indices.tolist() == [7] and diff1["b"].indices.tolist() == [3]
    path = sparse.save_diff(diff1, tmp_path / "d1.safetensors")
    loaded = sparse.load_diff(path)
    assert loaded["a"].shape == (4, 5) and torch.equal(loaded["b"].values, diff1["b"].values)
    both = sparse.apply_diffs(base, [loaded, diff2])
    other_order = sparse.apply_diffs(base, [diff2, loaded])
    for k in base:
        assert torch.allclose(both[k], base[k] + d1[k] * (d1[k].abs() > 1e-7) + d2[k], atol=1e-6)
        assert torch.equal(both[k], other_order[k])
    untouched = torch.ones(4, 5, dtype=torch.bool)
    untouched[1, 2] = untouched[0, 0] = False
    assert torch.equal(both["a"][untouched], base["a"][untouched])  # bit-identical outside the diffs


def test_load_diff_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="plain.safetensors: not an ftlab sparse diff"):
        sparse.load_diff(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        sparse.load_diff(junk)
    with pytest.raises(KeyError, match="'c'"):
        sparse.apply_diffs({"a": torch.zeros(2)}, [{"c": sparse.SparseDelta((2,), torch.tensor([0]), torch.ones(1))}])
