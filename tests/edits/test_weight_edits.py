"""Weight edits on state dicts with known deltas: scale, LiNeS, merge, reset, half-reset, tied embeddings."""

from __future__ import annotations

import pytest
import torch

from ftlab.edits import EDITS, apply_edit, edit_model
from ftlab.edits.lines import layer_scales
from ftlab.edits.merge import merge
from ftlab.edits.reset import half_reset_keys
from ftlab.models import state_dict_fp32, tiny_model
from ftlab.params import layer_map

N_LAYER = 4


def _pair(seed: int = 1, scale: float = 0.1):
    base_sd = state_dict_fp32(tiny_model(0, n_layer=N_LAYER, d_model=32))
    gen = torch.Generator().manual_seed(seed)
    delta = {k: scale * torch.randn(v.shape, generator=gen) for k, v in base_sd.items()}
    return base_sd, {k: base_sd[k] + delta[k] for k in base_sd}


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_is_explicit():
    assert {k for k, e in EDITS.items() if not e.composite} == {
        "scale",
        "lines",
        "merge",
        "reset",
        "half_reset",
        "graft",
    }
    assert {k: e.sweep for k, e in EDITS.items() if e.sweep} == {
        "scale": "factor",
        "lines": "alpha",
        "reset": "fraction",
        "tuco": "alpha",
    }
    with pytest.raises(ValueError, match="unknown edit"):
        apply_edit("nope", {}, {})


def test_scale_zero_and_one_are_bit_identical_and_half_is_midpoint():
    base_sd, tuned_sd = _pair()
    assert _equal(apply_edit("scale", base_sd, tuned_sd, factor=0.0), base_sd)
    assert _equal(apply_edit("scale", base_sd, tuned_sd, factor=1.0), tuned_sd)
    half = apply_edit("scale", base_sd, tuned_sd, factor=0.5)
    k = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(half[k], (base_sd[k] + tuned_sd[k]) / 2)
    two = apply_edit("scale", base_sd, tuned_sd, factor=2.0)
    torch.testing.assert_close(two[k], base_sd[k] + 2 * (tuned_sd[k] - base_sd[k]))


def test_lines_scales_each_block_exactly_by_its_lambda():
    base_sd, tuned_sd = _pair()
    out = apply_edit("lines", base_sd, tuned_sd, alpha=0.6)
    for k in base_sd:
        m = k.split(".")
        lam = 0.6 + 0.4 * int(m[2]) / (N_LAYER - 1) if k.startswith("model.layers.") else 0.6
        torch.testing.assert_close(out[k] - base_sd[k], lam * (tuned_sd[k] - base_sd[k]), rtol=0, atol=2e-7)
    # The deepest block keeps the full update bit for bit (β defaults to 1 − α).
    last = [k for k in base_sd if k.startswith(f"model.layers.{N_LAYER - 1}.")]
    assert all(torch.equal(out[k], tuned_sd[k]) for k in last)
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], tuned_sd["model.layers.0.mlp.up_proj.weight"])


def test_lines_explicit_beta_and_non_block_override():
    keys = [f"model.layers.{i}.w" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    lam = layer_scales(keys, alpha=0.2, beta=0.4, non_block_scale=1.0)
    assert [lam[f"model.layers.{i}.w"] for i in range(5)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert lam["lm_head.weight"] == 1.0 and lam["model.embed_tokens.weight"] == 1.0


def test_block_index_matches_the_prefix_exactly():
    keys = [
        "model.layers.0.mlp.experts.7.w",  # expert index must not count as a block index
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",  # not block 1
        "model.norm.weight",
        "vision.layers.0.w",  # other block list: not a decoder block
    ] + [f"model.layers.{i}.x" for i in range(2, 10)]
    mapping, n = layer_map(keys)
    assert n == 11
    assert mapping["model.layers.0.mlp.experts.7.w"] == 0
    assert mapping["model.layers.10.self_attn.q_proj.weight"] == 10
    assert mapping["model.norm.weight"] is None and mapping["vision.layers.0.w"] is None
    with pytest.raises(ValueError, match="expected 0..11"):
        layer_map(keys, n_layers=12)


def test_merge_of_identical_tunes_returns_the_tune():
    base_sd, tuned_sd = _pair()
    for out in (
        merge(base_sd, [tuned_sd, tuned_sd, tuned_sd]),
        merge(base_sd, [tuned_sd, tuned_sd], method="ties", density=1.0),
    ):
        for k in base_sd:
            torch.testing.assert_close(out[k], tuned_sd[k], rtol=0, atol=1e-6)


def test_task_arithmetic_sums_and_ties_elects_signs():
    base = {"model.layers.0.w": torch.zeros(4)}
    t1 = {"model.layers.0.w": torch.tensor([1.0, 2.0, -1.0, 0.1])}
    t2 = {"model.layers.0.w": torch.tensor([3.0, -1.0, -3.0, 0.1])}
    ta = merge(base, [t1, t2], lam=1.0)["model.layers.0.w"]
    assert torch.equal(ta, torch.tensor([4.0, 1.0, -4.0, 0.2]))
    # density 1: elected signs [+, +, -, +]; disjoint mean of the agreeing values.
    ties = merge(base, [t1, t2], method="ties", density=1.0)["model.layers.0.w"]
    torch.testing.assert_close(ties, torch.tensor([2.0, 2.0, -2.0, 0.1]))
    # density 0.5: keep |τ| >= the 2nd smallest (ties kept): t1 -> [1, 2, -1, 0], t2 -> [3, -1, -3, 0]
    trimmed = merge(base, [t1, t2], method="ties", density=0.5)["model.layers.0.w"]
    torch.testing.assert_close(trimmed, torch.tensor([2.0, 2.0, -2.0, 0.0]))


def test_merge_with_lines_uses_one_over_t_alpha():
    base_sd, tuned_sd = _pair()
    _, other = _pair(seed=2)
    out = merge(base_sd, [tuned_sd, other], lines_beta=0.5)
    k0, k3 = "model.layers.0.mlp.up_proj.weight", f"model.layers.{N_LAYER - 1}.mlp.up_proj.weight"
    total = {k: (tuned_sd[k] - base_sd[k]) + (other[k] - base_sd[k]) for k in (k0, k3)}
    torch.testing.assert_close(out[k0] - base_sd[k0], 0.5 * total[k0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[k3] - base_sd[k3], (0.5 + 0.5) * total[k3], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exclusive"):
        merge(base_sd, [tuned_sd], lam=1.0, lines_beta=0.5)


def test_dare_drops_and_rescales_each_task_vector():
    base_sd, tuned_sd = _pair()
    k = "model.layers.1.mlp.up_proj.weight"
    out = merge(base_sd, [tuned_sd], method="dare", density=0.25, seed=1)[k]
    tau = tuned_sd[k] - base_sd[k]
    dropped = out == base_sd[k]
    assert abs(float(dropped.float().mean()) - 0.75) < 0.03  # p = 1 − density of the entries go back to the base
    torch.testing.assert_close(out[~dropped] - base_sd[k][~dropped], 4 * tau[~dropped], rtol=0, atol=1e-6)
    again = merge(base_sd, [tuned_sd, tuned_sd], method="dare_ties", density=0.25, seed=1)[k]
    assert not torch.equal(again, out)  # each fine-tune gets its own drops
    _, other = _pair(seed=2)
    assert torch.equal(merge(base_sd, [tuned_sd, other], method="dare", density=1.0)[k],
                       merge(base_sd, [tuned_sd, other])[k])  # fmt: skip


@pytest.mark.parametrize("how", ["random", "smallest", "layers"])
def test_reset_all_returns_base_and_none_returns_tune(how):
    base_sd, tuned_sd = _pair()
    assert _equal(apply_edit("reset", base_sd, tuned_sd, fraction=1.0, how=how), base_sd)
    assert _equal(apply_edit("reset", base_sd, tuned_sd, fraction=0.0, how=how), tuned_sd)


def test_reset_random_resets_the_requested_share_with_exact_values():
    base_sd, tuned_sd = _pair()
    out = apply_edit("reset", base_sd, tuned_sd, fraction=0.3, how="random", seed=5)
    total = sum(v.numel() for v in base_sd.values())
    at_base = sum(int((out[k] == base_sd[k]).sum()) for k in base_sd)
    at_tuned = sum(int((out[k] == tuned_sd[k]).sum()) for k in base_sd)
    assert at_base + at_tuned == total
    assert abs(at_base / total - 0.3) < 0.01
    again = apply_edit("reset", base_sd, tuned_sd, fraction=0.3, how="random", seed=5)
    assert _equal(out, again)
    other = apply_edit("reset", base_sd, tuned_sd, fraction=0.3, how="random", seed=6)
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(out[k] == base_sd[k], other[k] == base_sd[k])  # the seed matters


def test_reset_smallest_keeps_the_largest_changes():
    base = {"model.layers.0.w": torch.zeros(6)}
    tuned = {"model.layers.0.w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 1.0])}
    out = apply_edit("reset", base, tuned, fraction=0.5, how="smallest")["model.layers.0.w"]
    assert torch.equal(out, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 1.0]))


def test_reset_layers_goes_from_the_input_side():
    base_sd, tuned_sd = _pair()
    # units: embeddings, 4 blocks, [final norm + head] -> 6 units; half = embeddings + blocks 0, 1
    out = apply_edit("reset", base_sd, tuned_sd, fraction=0.5, how="layers")
    for k in base_sd:
        reset = k == "model.embed_tokens.weight" or k.startswith(("model.layers.0.", "model.layers.1."))
        assert torch.equal(out[k], base_sd[k] if reset else tuned_sd[k]), k


def test_half_reset_takes_half_of_each_category_per_block():
    base_sd, tuned_sd = _pair()
    chosen = half_reset_keys(list(base_sd), seed=3)
    mlp_counts = []
    for ell in range(N_LAYER):
        pre = f"model.layers.{ell}."
        attn = [k for k in chosen if k.startswith(pre + "self_attn.")]
        norms = [k for k in chosen if k.startswith(pre) and "layernorm" in k]
        mlp_counts.append(len([k for k in chosen if k.startswith(pre + "mlp.")]))
        assert len(attn) == 2 and len(norms) == 1
    assert sorted(mlp_counts) == [1, 1, 2, 2]
    assert not any(k in chosen for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    out = apply_edit("half_reset", base_sd, tuned_sd, seed=3)
    assert all(torch.equal(out[k], base_sd[k] if k in chosen else tuned_sd[k]) for k in base_sd)


def test_tied_embeddings_are_edited_once_and_loaded():
    base = tiny_model(0, n_layer=2, d_model=32)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    tuned = tiny_model(0, n_layer=2, d_model=32)
    tuned.config.tie_word_embeddings = True
    tuned.tie_weights()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert tuned.lm_head.weight.data_ptr() == tuned.model.embed_tokens.weight.data_ptr()
    edited = edit_model(base, tuned, "reset", fraction=0.5, how="random")
    emb = edited.model.embed_tokens.weight
    assert edited.lm_head.weight.data_ptr() == emb.data_ptr()
    is_base = emb == base.model.embed_tokens.weight
    assert 0.4 < float(is_base.float().mean()) < 0.6
    assert torch.equal(tuned.model.embed_tokens.weight, tuned.lm_head.weight)  # the tuned model was not touched
