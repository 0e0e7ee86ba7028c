"""Skill localization by grafting on a tiny model fine-tuned in the test."""

from __future__ import annotations

import copy

import pytest
import torch

from ftlab.edits import apply_edit
from ftlab.edits.graft import base_patch, localize, select_keys
from ftlab.models import state_dict_fp32, tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]


@pytest.fixture(scope="module")
def tuned_pair():
    """A base and a copy trained a few Adam steps on RECORDS (so the fine-tune really lowers the loss)."""
    from ftlab.edits.graft import _batches

    torch.manual_seed(0)
    base = tiny_model(0, n_layer=2, d_model=32).eval()
    tuned = copy.deepcopy(base).train()
    tok = tiny_tokenizer()
    opt = torch.optim.Adam(tuned.parameters(), lr=5e-3)
    batch = _batches(RECORDS, tok, batch_size=8, max_length=64)[0]
    for _ in range(12):
        opt.zero_grad()
        tuned(**batch).loss.backward()
        opt.step()
    return base, tuned.eval(), tok


def test_base_patch_takes_the_largest_movements():
    base = {"model.layers.0.a.weight": torch.zeros(2, 5), "model.layers.1.b.weight": torch.zeros(2, 5)}
    tuned = {k: torch.arange(10.0).view(2, 5) * (1 if ".a." in k else -2) for k in base}
    mask = base_patch(base, tuned, sparsity=0.2, keys=list(base))
    # |τ| of b is 0, 2, ..., 18 and of a 0..9: the top 4 of the 20 entries are b's last four (18, 16, 14, 12)
    assert int(mask["model.layers.0.a.weight"].sum()) == 0
    assert mask["model.layers.1.b.weight"].flatten().tolist() == [False] * 6 + [True] * 4


def test_graft_has_requested_sparsity_and_exact_values(tuned_pair):
    base, tuned, tok = tuned_pair
    result = localize(base, tuned, tok, RECORDS, sparsity=0.01, epochs=2)
    keys = select_keys(list(base.state_dict()), {k: v.shape for k, v in base.state_dict().items()})
    assert result.keys == keys and "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    assert result.n_grafted == round(0.01 * result.n_selected) == sum(int(m.sum()) for m in result.mask.values())
    base_sd, tuned_sd = state_dict_fp32(base), state_dict_fp32(tuned)
    grafted = apply_edit("graft", base_sd, tuned_sd, mask=result.mask)
    for k in base_sd:
        m = result.mask.get(k, torch.zeros_like(base_sd[k], dtype=torch.bool))
        assert torch.equal(grafted[k][m], tuned_sd[k][m]), k
        assert torch.equal(grafted[k][~m], base_sd[k][~m]), k


def test_graft_recovers_loss_and_never_loses_to_the_base_patch(tuned_pair):
    base, tuned, tok = tuned_pair
    result = localize(base, tuned, tok, RECORDS, sparsity=0.1, epochs=3)
    assert result.tuned_loss < result.base_loss
    assert result.graft_loss <= result.history[0]["loss"]  # the base patch is the epoch-0 candidate
    assert result.graft_loss < result.base_loss and result.recovered > 0
    assert len(result.history) == 4


def test_mask_step_goes_downhill(tuned_pair):
    """One step of S changes γ against ∂L/∂γ = g_θ ⊙ τ (the first-order change of the loss is negative)."""
    from ftlab.edits.graft import _batches, _mean_loss, _Relaxation

    base, tuned, tok = tuned_pair
    base_sd, tuned_sd = state_dict_fp32(base), state_dict_fp32(tuned)
    keys = select_keys(list(base_sd), {k: v.shape for k, v in base_sd.items()})
    work = copy.deepcopy(base).float()
    params = dict(work.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in keys)
    relax = _Relaxation(base_sd, tuned_sd, keys, 0.1, 10.0, 0, params)
    before = relax.gamma()
    relax.load(before)
    _mean_loss(work, _batches(RECORDS, tok, batch_size=8, max_length=64), grad=True)
    grad_gamma = {k: params[k].grad * (tuned_sd[k] - base_sd[k]) for k in keys}  # ∂L/∂γ
    relax.step(None)
    after = relax.gamma()
    first_order = sum(float((grad_gamma[k] * (after[k] - before[k])).sum()) for k in keys)
    assert first_order < 0


def test_first_mask_step_beats_the_base_patch(tuned_pair):
    # epoch 0 is the base patch; one step of the mask must find a rounded graft with a lower loss on the task data
    base, tuned, tok = tuned_pair
    result = localize(base, tuned, tok, RECORDS, sparsity=0.1, epochs=1)
    assert result.history[1]["loss"] < result.history[0]["loss"]


def test_graft_include_restricts_the_search(tuned_pair):
    base, tuned, tok = tuned_pair
    result = localize(base, tuned, tok, RECORDS, sparsity=0.05, epochs=0, include=r"layers\.1\.mlp")
    assert set(result.mask) == {f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match="no parameters to graft"):
        localize(base, tuned, tok, RECORDS, include="nothing-matches")
