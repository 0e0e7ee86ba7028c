"""The edits and analyses on the embedded SmolLM2-135M-Instruct (tied embeddings, 30 blocks); slow."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.edits import TuCoModel, edit_model
from ftlab.edits.tuco import components
from ftlab.models import load_model, save_model, state_dict_fp32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    base, tok = load_model("smollm2-135m-instruct", device="cpu")
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("real") / "tuned"
    save_model(tuned, tok, folder)
    return base, tuned, tok, folder


def test_scale_zero_cli_returns_the_embedded_base(real, tmp_path):
    base, _, _, folder = real
    out = tmp_path / "s0"
    res = CliRunner().invoke(
        app,
        [
            "edit",
            "scale",
            "--base",
            "smollm2-135m-instruct",
            "--tuned",
            str(folder),
            "--factor",
            "0",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    model, _ = load_model(out, device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    got, want = state_dict_fp32(model), state_dict_fp32(base)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tuco_on_the_embedded_model(real):
    base, tuned, tok, _ = real
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = tuned(input_ids=ids).logits
    assert torch.equal(TuCoModel(base, tuned, 1.0)(input_ids=ids).logits, ref)
    parts = components(base, tuned, ids)
    assert len(parts) == 30
    for a, b in zip(parts[:-1], parts[1:], strict=True):
        torch.testing.assert_close(a["x"] + a["ptc"] + a["ftc"], b["x"], rtol=0, atol=1e-4)


def test_lines_edit_model_keeps_ties(real):
    base, tuned, _, _ = real
    edited = edit_model(base, tuned, "lines", alpha=0.6)
    assert edited.lm_head.weight.data_ptr() == edited.model.embed_tokens.weight.data_ptr()
    d_t = tuned.model.embed_tokens.weight - base.model.embed_tokens.weight
    d_e = edited.model.embed_tokens.weight - base.model.embed_tokens.weight
    torch.testing.assert_close(d_e, 0.6 * d_t, rtol=0, atol=1e-6)
