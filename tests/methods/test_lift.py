"""LIFT: the top entries of each matrix's low-rank approximation train, with sparse AdamW state and mask refresh."""

import pytest
import torch

from ftlab.methods import lift
from ftlab.methods._sparse_adam import SparseAdamW
from ftlab.methods.base import PlanContext
from ftlab.models import tiny_model

Q = "model.layers.1.self_attn.q_proj.weight"


def test_budget_is_a_lora_of_the_same_rank():
    assert lift.budget((64, 64), 2) == 256  # (m + n) * r
    assert lift.budget((32, 64), 2) == 192
    assert lift.budget((4, 4), 128) == 16  # capped at every entry


@pytest.mark.parametrize("select", ["largest", "smallest"])
def test_mask_holds_the_extreme_entries_of_the_low_rank_approximation(select):
    model = tiny_model()
    plan = lift.plan(model, lift.Config(lora_rank=2, filter_rank=4, select=select), PlanContext())
    w = dict(model.named_parameters())[Q].detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    score = ((u[:, :4] * s[:4]) @ vh[:4]).abs()  # |W_r| with r = 4
    mask = plan.grad_masks[Q].bool()
    assert int(mask.sum()) == 256
    if select == "largest":
        assert score[mask].min() >= score[~mask].max()
    else:
        assert score[mask].max() <= score[~mask].min()
    assert len(plan.trainable) == 4 * 7  # q k v o gate up down in each of 4 blocks; no norms, embeddings or head
    total = sum(p.numel() for n, p in model.named_parameters() if n in plan.trainable)
    assert plan.info["density"] == round(plan.info["trainable_params"] / total, 6)


@pytest.mark.parametrize("select", ["largest", "smallest"])
def test_training_moves_exactly_the_masked_entries(train_tiny, changed, select):
    cfg = lift.Config(lora_rank=2, filter_rank=4, select=select)
    expected = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in tiny_model().named_parameters()}
    k_total = 0
    for name in lift.plan(tiny_model(), cfg, PlanContext()).trainable:
        idx = lift.select_entries(dict(tiny_model().named_parameters())[name], cfg)
        expected[name].view(-1)[idx] = True
        k_total += idx.numel()
    base, model, result = train_tiny("lift", {"lora_rank": 2, "filter_rank": 4, "select": select})
    moved = changed(base, model)
    assert set(moved) == {n for n, m in expected.items() if m.any()}
    for name, m in moved.items():
        assert torch.equal(m, expected[name]), name  # moved entries == mask, everything else bit-identical
    assert result.trainable_params == k_total
    # state: int32 indices + two fp32 moments of length k per matrix, plus a scalar step counter each
    assert result.optimizer_state_bytes == 12 * k_total + 4 * result.plan_info["matrices"]


def _toy():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6))
    cfg = lift.Config(lora_rank=1, filter_rank=2)  # k = (8 + 6) * 1 = 14 of 48
    mask = torch.zeros(8, 6)
    opt = SparseAdamW([p], {p: lift.select_entries(p, cfg)}, lambda t: lift.select_entries(t, cfg), 2, {p: mask})
    return p, cfg, mask, opt


def test_state_is_sparse_and_untouched_entries_stay_put():
    p, cfg, mask, opt = _toy()
    before = p.detach().clone()
    p.grad = torch.randn(8, 6)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].shape == (14,) and state["idx"].dtype == torch.int32
    assert int(mask.sum()) == 14
    assert torch.equal(p.detach()[mask == 0], before[mask == 0])
    assert bool((p.detach()[mask == 1] != before[mask == 1]).all())


def test_refresh_reselects_from_current_weights_and_carries_moments():
    p, cfg, mask, opt = _toy()
    p.grad = torch.randn(8, 6)
    opt.step()  # step 1: no refresh yet (interval 2)
    old_idx = opt.state[p]["idx"].long().clone()
    with torch.no_grad():
        p.mul_(torch.linspace(0.1, 3.0, 48).view(8, 6))  # reshape the spectrum so the selection changes
    dense_m = torch.zeros(48)
    dense_m[old_idx] = opt.state[p]["exp_avg"]
    opt.refresh()
    new_idx = opt.state[p]["idx"].long()
    assert torch.equal(new_idx, lift.select_entries(p, cfg))
    assert not torch.equal(new_idx, old_idx)
    assert torch.equal(opt.state[p]["exp_avg"], dense_m[new_idx])  # kept entries keep momentum, new ones start at 0
    assert torch.equal(mask.view(-1).nonzero().view(-1), new_idx)  # the gradient mask follows


def test_step_refreshes_on_the_interval_and_resume_keeps_integer_indices():
    p, cfg, mask, opt = _toy()
    calls = []
    opt.select = lambda t: calls.append(1) or lift.select_entries(t, cfg)
    for _ in range(4):
        p.grad = torch.randn(8, 6)
        opt.step()
    assert len(calls) == 2  # after optimizer steps 2 and 4
    saved = opt.state_dict()
    p2, _, mask2, opt2 = _toy()
    opt2.load_state_dict(saved)
    assert opt2.state[p2]["idx"].dtype == torch.int32
    assert torch.equal(opt2.state[p2]["idx"], opt.state[p]["idx"])
    assert torch.equal(mask2, mask) and opt2.optimizer_steps == 4


def test_masks_refresh_during_training_and_the_plan_sees_them(train_tiny, changed, monkeypatch):
    plans = []
    original = lift.plan
    monkeypatch.setattr(lift, "plan", lambda *a: plans.append(original(*a)) or plans[-1])
    params = {"lora_rank": 2, "filter_rank": 4, "update_interval": 1}  # re-select after every optimizer step
    base, model, result = train_tiny("lift", params)
    (plan,) = plans
    cfg = lift.Config(**params)
    weights = dict(model.named_parameters())
    initial = {n: lift.select_entries(torch.nn.Parameter(base[n]), cfg) for n in plan.trainable}
    now = {n: lift.select_entries(weights[n], cfg) for n in plan.trainable}
    assert any(not torch.equal(initial[n], now[n]) for n in plan.trainable)  # the selection did move
    for n in plan.trainable:
        # the plan's gradient masks (shared with the hooks) hold the selection made from the final weights
        assert torch.equal(plan.grad_masks[n].view(-1).nonzero().view(-1), now[n]), n
    assert result.trainable_params == sum(i.numel() for i in now.values())


def _block_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n}


@pytest.mark.parametrize("clip_grad", [False, True])
def test_gradients_are_not_clipped_unless_asked(train_tiny, clip_grad):
    # The released training loop steps the optimizer straight after backward. A max_grad_norm far below the
    # gradient's norm shrinks clipped gradients to ~1e-9, well under AdamW's eps (1e-6), so the updates change.
    params = {"lora_rank": 2, "filter_rank": 4, "update_interval": 0, "clip_grad": clip_grad}
    _, loose, result = train_tiny("lift", params, steps=2, max_grad_norm=1.0)
    _, tight, _ = train_tiny("lift", params, steps=2, stage=1, max_grad_norm=1e-9)
    a, b = _block_weights(loose), _block_weights(tight)
    gap = max(float((a[n] - b[n]).abs().max()) for n in a)
    if clip_grad:
        assert gap > 1e-3  # clipping on: train.max_grad_norm changes the result
    else:
        assert gap < 1e-6  # clipping off: train.max_grad_norm has no effect
    assert result.plan_info["clip_grad"] is clip_grad
    callbacks = lift.plan(tiny_model(), lift.Config(**params), PlanContext()).callbacks
    assert any(isinstance(c, lift.NoGradClipping) for c in callbacks) is not clip_grad


def test_no_clipping_callback_restores_the_trainer_setting():
    from types import SimpleNamespace

    args = SimpleNamespace(max_grad_norm=1.0)
    callback = lift.NoGradClipping()
    callback.on_train_begin(args, None, None)
    assert args.max_grad_norm == 0.0  # the trainer clips only when max_grad_norm > 0
    callback.on_train_end(args, None, None)
    assert args.max_grad_norm == 1.0
