"""Intruder dimensions on planted deltas, and per-layer weight change."""

from __future__ import annotations

import copy

import pytest
import torch

from ftlab.analysis import compare_intruders, intruder_dimensions, layer_change
from ftlab.analysis.intruders import target_keys
from ftlab.models import state_dict_fp32, tiny_model

KEY = "model.layers.1.mlp.down_proj.weight"


def _base():
    return state_dict_fp32(tiny_model(0, n_layer=2, d_model=32))


def _planted(base_sd, key=KEY, strength=10.0, seed=0):
    """Tuned = base plus a strong rank-1 update along u, spread evenly over all base left singular vectors.

    |cos(u, u0_i)| = 1/sqrt(r) for every base vector (0.18 for r = 32), so u aligns with no single base vector.
    """
    w = base_sd[key]
    gen = torch.Generator().manual_seed(seed)
    u0 = torch.linalg.svd(w, full_matrices=False).U  # out x r
    u = u0 @ torch.ones(u0.shape[1]) / u0.shape[1] ** 0.5
    v = torch.randn(w.shape[1], generator=gen)
    v = v / v.norm()
    sigma_max = torch.linalg.matrix_norm(w, ord=2)
    tuned = {k: t.clone() for k, t in base_sd.items()}
    tuned[key] = w + strength * sigma_max * torch.outer(u, v)
    return tuned, u


def test_no_intruders_when_tuned_equals_base():
    base_sd = _base()
    res = intruder_dimensions(base_sd, copy.deepcopy(base_sd))
    assert res["total"] == 0 and res["energy_share"] == 0.0
    assert res["n_matrices"] == 14 == len(target_keys(base_sd))  # 2 blocks x 7 projections
    assert all(s == 1.0 for m in res["matrices"] for s in m["similarity"])


def test_planted_rank_one_direction_is_an_intruder():
    base_sd = _base()
    tuned, u = _planted(base_sd)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-5)
    res = intruder_dimensions(base_sd, tuned, k=10, eps=0.5)
    row = next(m for m in res["matrices"] if m["key"] == KEY)
    assert row["count"] >= 1 and row["similarity"][0] < 0.5  # the new top singular vector matches no base vector
    assert res["total"] == row["count"]  # nothing else moved
    assert res["per_layer"][1] == row["count"] and res["per_layer"][0] == 0
    assert res["per_module"]["down_proj"] == row["count"]
    # the planted direction carries most of the matrix energy (σ ≈ 10 σ_max)
    assert row["energy_share"] > 0.5 and 0 < res["energy_share"] < row["energy_share"]


def test_small_update_is_not_an_intruder_and_comparison_shares_the_base():
    base_sd = _base()
    strong, _ = _planted(base_sd)
    weak, _ = _planted(base_sd, strength=1e-4)
    res = compare_intruders(base_sd, {"strong": strong, "weak": weak})
    assert res["strong"]["total"] >= 1 and res["weak"]["total"] == 0


def _householder(n: int) -> torch.Tensor:
    """An orthogonal n x n matrix whose first column is the uniform unit vector and whose other columns stay close to
    the standard basis (reflection mapping e_1 to 1/sqrt(n))."""
    e1, target = torch.zeros(n), torch.full((n,), n**-0.5)
    e1[0] = 1.0
    w = (e1 - target) / (e1 - target).norm()
    return torch.eye(n) - 2 * torch.outer(w, w)


@pytest.mark.parametrize("rotated", ["left", "right"])
def test_intruders_compare_left_singular_vectors_only(rotated):
    """W0 = U0 S V0ᵀ; the fine-tune rotates only its left (or only its right) singular vectors, so the top left (right)
    vector of W_ft spreads evenly over the base ones. Only a new *left* vector is an intruder."""
    base_sd = _base()
    out, inn = base_sd[KEY].shape  # 32 x 64: not square, so U (out x r) and V (in x r) cannot be confused
    gen = torch.Generator().manual_seed(1)
    r = min(out, inn)
    u0 = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q
    v0 = torch.linalg.qr(torch.randn(inn, r, generator=gen)).Q
    s = torch.linspace(4.0, 1.0, r)  # distinct singular values: the SVD is unique up to signs
    rot = _householder(r)
    u_ft, v_ft = (u0 @ rot, v0) if rotated == "left" else (u0, v0 @ rot)
    base_sd[KEY] = (u0 * s) @ v0.T
    tuned = {k: v.clone() for k, v in base_sd.items()}
    tuned[KEY] = (u_ft * s) @ v_ft.T
    row = next(m for m in intruder_dimensions(base_sd, tuned, k=10, eps=0.5)["matrices"] if m["key"] == KEY)
    if rotated == "left":
        assert row["count"] == 1 and row["similarity"][0] == pytest.approx(r**-0.5, abs=1e-3)  # 1/sqrt(32) = 0.18
        assert min(row["similarity"][1:]) > 0.9  # the other left vectors barely moved
        assert row["energy_share"] == pytest.approx(16.0 / float((s**2).sum()), rel=1e-3)  # σ_1² = 16
    else:
        assert row["count"] == 0 and min(row["similarity"]) > 0.999  # same left vectors: nothing intrudes


def test_layer_change_reports_where_the_delta_lives():
    base_sd = _base()
    tuned = {k: v.clone() for k, v in base_sd.items()}
    tuned[KEY][0, :3] += torch.tensor([3.0, 4.0, 0.0])  # ‖Δ‖ = 5, two entries changed
    res = layer_change(base_sd, tuned)
    assert res["per_layer"][0]["delta_norm"] == 0.0 and res["per_layer"][1]["delta_norm"] == 5.0
    assert res["per_module"]["down_proj"]["delta_norm"] == 5.0 and res["per_module"]["q_proj"]["delta_norm"] == 0
    key = res["per_key"][KEY]
    assert key["changed"] == 2 / base_sd[KEY].numel()
    assert abs(key["relative"] - 5.0 / float(base_sd[KEY].norm())) < 1e-6
    assert res["total"]["delta_norm"] == 5.0 and set(res["non_block"]) >= {"model.embed_tokens.weight"}


def test_analyze_intruders_lora_adapter_vs_full_side_by_side(tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from typer.testing import CliRunner

    from ftlab.cli import app
    from ftlab.models import save_model, tiny_tokenizer

    tok = tiny_tokenizer()
    save_model(tiny_model(0, n_layer=2, d_model=32), tok, tmp_path / "base")
    full = tiny_model(0, n_layer=2, d_model=32)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    save_model(full, tok, tmp_path / "full")
    lora = get_peft_model(
        tiny_model(0, n_layer=2, d_model=32), LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(5.0)  # a strong rank-1 update in every q_proj
    lora.save_pretrained(tmp_path / "lora")
    args = ["analyze", "intruders", "--base", str(tmp_path / "base")]
    args += ["--tuned", str(tmp_path / "lora"), "--tuned", str(tmp_path / "full")]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout.strip().splitlines()[-1])["tuned"]
    lora_res, full_res = res[str(tmp_path / "lora")], res[str(tmp_path / "full")]
    assert lora_res["per_module"]["q_proj"] >= 1 and lora_res["total"] == lora_res["per_module"]["q_proj"]
    assert full_res["total"] == 0
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "energy share" in table.stdout
