"""``ftlab edit ...`` on tiny models saved to disk: the written model loads and holds the edited weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.models import load_model, save_model, state_dict_fp32, tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of a tiny base and a perturbed copy (the "fine-tune")."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_model(0, n_layer=2, d_model=32)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok = tiny_tokenizer()
    save_model(base, tok, root / "base")
    save_model(tuned, tok, root / "tuned")
    return root, state_dict_fp32(base), state_dict_fp32(tuned)


def _run(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_edit_scale_zero_writes_the_base(saved):
    root, base_sd, _ = saved
    _run(*f"edit scale --base {root / 'base'} --tuned {root / 'tuned'} --factor 0 --out {root / 's0'}".split())
    model, _ = load_model(root / "s0")
    out = state_dict_fp32(model)
    assert all(torch.equal(out[k], base_sd[k]) for k in base_sd)
    info = json.loads((root / "s0" / "ftlab_edit.json").read_text())
    assert info["edit"] == "scale" and info["settings"] == {"factor": 0.0}


def test_edit_lines_alpha_alone(saved):
    root, base_sd, tuned_sd = saved
    _run(*f"edit lines --base {root / 'base'} --tuned {root / 'tuned'} --alpha 0.6 --out {root / 'l6'}".split())
    out = state_dict_fp32(load_model(root / "l6")[0])
    k0, k1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[k0] - base_sd[k0], 0.6 * (tuned_sd[k0] - base_sd[k0]), rtol=0, atol=1e-6)
    assert torch.equal(out[k1], tuned_sd[k1])  # last block: α + β = 1


def test_edit_merge_reset_and_half_reset(saved):
    root, base_sd, tuned_sd = saved
    b, t = str(root / "base"), str(root / "tuned")
    _run("edit", "merge", "--base", b, "--tuned", t, "--tuned", t, "--out", str(root / "m"))
    merged = state_dict_fp32(load_model(root / "m")[0])
    assert all(torch.allclose(merged[k], tuned_sd[k], atol=1e-6) for k in base_sd)
    _run("edit", "reset", "--base", b, "--tuned", t, "--fraction", "1", "--how", "smallest", "--out", str(root / "r"))
    reset = state_dict_fp32(load_model(root / "r")[0])
    assert all(torch.equal(reset[k], base_sd[k]) for k in base_sd)
    _run("edit", "half-reset", "--base", b, "--tuned", t, "--out", str(root / "h"))
    half = state_dict_fp32(load_model(root / "h")[0])
    at_base = [k for k in base_sd if torch.equal(half[k], base_sd[k])]
    assert 0 < len(at_base) < len(base_sd) and "lm_head.weight" not in at_base


def test_edit_rejects_bad_settings_cleanly(saved):
    root, _, _ = saved
    result = runner.invoke(
        app,
        [
            "edit",
            "reset",
            "--base",
            str(root / "base"),
            "--tuned",
            str(root / "tuned"),
            "--fraction",
            "2",
            "--out",
            str(root / "bad"),
        ],
    )
    assert result.exit_code == 2 and "fraction must be in [0, 1]" in result.output
    assert not (root / "bad").exists()


def test_edit_graft_saves_mask_and_model(saved, completion_file):
    root, base_sd, tuned_sd = saved
    result = _run(
        *f"edit graft --base {root / 'base'} --tuned {root / 'tuned'} --data {completion_file}".split(),
        *f"--sparsity 0.01 --epochs 1 --limit 4 --out {root / 'g'} --json".split(),
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file

    mask = load_file(str(root / "g" / "graft_mask.safetensors"))
    assert summary["n_grafted"] == sum(int(m.sum()) for m in mask.values()) == round(0.01 * summary["n_selected"])
    out = state_dict_fp32(load_model(root / "g")[0])
    for k in base_sd:
        m = mask.get(k, torch.zeros_like(base_sd[k], dtype=torch.bool))
        assert torch.equal(out[k][m], tuned_sd[k][m]) and torch.equal(out[k][~m], base_sd[k][~m])
    # the saved mask applied again (streamed, no search) writes the same weights
    _run(*f"edit graft --base {root / 'base'} --tuned {root / 'tuned'} --mask {root / 'g' / 'graft_mask.safetensors'}"
         f" --out {root / 'g2'}".split())  # fmt: skip
    again = load_file(str(root / "g2" / "model.safetensors"))
    assert json.loads((root / "g2" / "ftlab_edit.json").read_text())["streamed"] is True
    assert all(torch.equal(again[k], out[k]) for k in again)
    res = runner.invoke(app, f"edit graft --base {root / 'base'} --tuned {root / 'tuned'} --out {root / 'g3'}".split())
    assert res.exit_code == 2 and "--data" in res.output


def test_edit_tuco_and_eft_generate(saved):
    root, _, _ = saved
    b, t = str(root / "base"), str(root / "tuned")
    res = _run(*f"edit tuco --base {b} --tuned {t} --alpha 1 --prompt Hi --max-new-tokens 3 --json".split())
    tuco_out = json.loads(res.stdout.strip().splitlines()[-1])["outputs"]
    res = _run(
        *f"edit eft --large-base {b} --small-tuned {t} --small-base {b} --prompt Hi --max-new-tokens 3 --json".split()
    )
    eft_out = json.loads(res.stdout.strip().splitlines()[-1])["outputs"]
    from ftlab.evals.generation import generate

    want = generate(load_model(t)[0], tiny_tokenizer(), ["Hi"], max_new_tokens=3, progress=False)
    assert [r["output"] for r in tuco_out] == want == [r["output"] for r in eft_out]


@pytest.mark.parametrize("base_format", [None, "plain"])
def test_edit_eft_gives_the_bases_their_own_prompt_format(saved, monkeypatch, base_format):
    """`--base-format plain` feeds both base models plain text and the fine-tune its chat template; without it every
    model reads the same chat-templated prompt (and the generations differ between the two)."""
    from _util import spy_kwargs

    from ftlab import edits

    seen = spy_kwargs(monkeypatch, edits, "EFTModel")
    root = saved[0]
    args = ["edit", "eft", "--large-base", str(root / "tuned"), "--small-tuned", str(root / "tuned")]
    args += ["--small-base", str(root / "base"), "--prompt", "Hi", "--max-new-tokens", "4", "--json"]
    done = _run(*args, *(["--base-format", base_format] if base_format else []))
    assert json.loads(done.stdout.strip().splitlines()[-1])["outputs"][0]["prompt"] == "Hi"
    assert seen["formats"] == (None if base_format is None else ["plain", "chat", "plain"])
