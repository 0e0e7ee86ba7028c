"""Tuning contribution (TuCo) on tiny models, and the ``ftlab analyze`` commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from ftlab.analysis import tuning_contribution
from ftlab.cli import app
from ftlab.edits.tuco import components
from ftlab.models import save_model, tiny_model, tiny_tokenizer

PROMPTS = ["Capital of Zorland?", "Hello there"]


@pytest.fixture(scope="module")
def models():
    base = tiny_model(0, n_layer=3, d_model=32).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # change only the last block: the fine-tuning component lives there
        for p in tuned.model.layers[2].parameters():
            p.add_(0.3 * torch.randn_like(p))
    return base, tuned, tiny_tokenizer()


def test_tuco_is_zero_when_tuned_equals_base(models):
    base, _, tok = models
    res = tuning_contribution(base, copy.deepcopy(base), tok, PROMPTS)
    assert res["mean_tuco"] == 0.0 and res["n"] == 2
    assert all(x == 0.0 for r in res["prompts"] for x in r["per_layer"])


def test_tuco_per_layer_and_overall_match_algorithm_1(models):
    base, tuned, tok = models
    res = tuning_contribution(base, tuned, tok, PROMPTS, norm="l1", chat=False, ids=["a", "b"])
    r = res["prompts"][0]
    assert r["id"] == "a" and r["per_layer"][0] == 0.0 and r["per_layer"][1] == 0.0 and r["per_layer"][2] > 0
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    parts = components(base, tuned, ids)
    ftc = sum(p["ftc"][0, -1].double() for p in parts)
    ptc = sum(p["ptc"][0, -1].double() for p in parts)
    want = float(ftc.abs().sum()) / (float(ftc.abs().sum()) + float(ptc.abs().sum()))
    assert r["tuco"] == pytest.approx(want, rel=1e-9) and 0 < r["tuco"] < 1
    assert res["mean_tuco"] == pytest.approx(sum(p["tuco"] for p in res["prompts"]) / 2)
    l2 = tuning_contribution(base, tuned, tok, PROMPTS[:1], norm="l2", chat=False)
    assert l2["prompts"][0]["tuco"] != pytest.approx(r["tuco"])


def _components_by_hand(base, tuned, ids):
    """Per block, PTC_l = f_PT(x_l) and FTC_l = f_FT(x_l) − f_PT(x_l) on the tuned model's own trajectory x_l, with
    the decoder layers called directly (one unpadded sequence)."""
    from _util import layer_inputs

    inner = tuned.model
    x, kw = layer_inputs(tuned, ids)
    with torch.no_grad():
        ptc, ftc = [], []
        for layer_pt, layer_ft in zip(base.model.layers, inner.layers, strict=True):
            out_pt, out_ft = layer_pt(x, **kw), layer_ft(x, **kw)
            ptc.append((out_pt - x)[0, -1].double())
            ftc.append((out_ft - out_pt)[0, -1].double())
            x = out_ft  # the tuned trajectory: x + PTC + FTC
    return ptc, ftc


def test_tuco_uses_the_tuned_trajectory_when_every_block_changed(models):
    base, _, tok = models
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # every block moves, so the tuned and base trajectories part from the first block on
        for p in tuned.model.layers.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    res = tuning_contribution(base, tuned, tok, PROMPTS[:1], norm="l1", chat=False)
    ptc, ftc = _components_by_hand(base, tuned, torch.tensor([tok(PROMPTS[0])["input_ids"]]))
    f_all, p_all = float(sum(ftc).abs().sum()), float(sum(ptc).abs().sum())
    row = res["prompts"][0]
    assert row["ftc_norm"] == pytest.approx(f_all, rel=1e-4) and row["ptc_norm"] == pytest.approx(p_all, rel=1e-4)
    assert row["tuco"] == pytest.approx(f_all / (f_all + p_all), rel=1e-4)
    l1 = [(float(f.abs().sum()), float(q.abs().sum())) for f, q in zip(ftc, ptc, strict=True)]
    per_layer = [f / (f + q) for f, q in l1]
    assert row["per_layer"] == pytest.approx(per_layer, rel=1e-4)
    assert all(x > 0 for x in row["per_layer"])


def test_analyze_commands_print_one_json_object(models, tmp_path):
    base, tuned, tok = models
    save_model(base, tok, tmp_path / "b")
    save_model(tuned, tok, tmp_path / "t")
    runner = CliRunner()
    common = ["--base", str(tmp_path / "b"), "--tuned", str(tmp_path / "t"), "--json"]
    out = runner.invoke(app, ["analyze", "intruders", *common])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["k"] == 10 and res["tuned"][str(tmp_path / "t")]["per_layer"][:2] == [0, 0]
    out = runner.invoke(app, ["analyze", "layers", *common])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["per_layer"][0]["delta_norm"] == 0.0 and res["per_layer"][2]["delta_norm"] > 0
    out = runner.invoke(app, ["analyze", "tuco", *common, "--prompt", "Hi", "--prompt", "Yo"])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 2 and 0 < res["mean_tuco"] < 1
    out = runner.invoke(app, ["analyze", "tuco", *common, "--suite", "world-facts", "--limit", "3"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["suite"] == "world-facts" and res["n"] == 3 and len({r["id"] for r in res["prompts"]}) == 3
    bad = runner.invoke(app, ["analyze", "tuco", *common, "--suite", "no-such-suite"])
    assert bad.exit_code == 2
    table = runner.invoke(app, ["analyze", "layers", "--base", str(tmp_path / "b"), "--tuned", str(tmp_path / "t")])
    assert table.exit_code == 0 and "layer 2" in table.stdout
