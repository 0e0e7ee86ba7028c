"""Decode-time composites: TuCo's scaled fine-tuning component and EFT up-scaling, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from ftlab.edits import EFTModel, TuCoModel
from ftlab.edits.tuco import components, decoder_layers
from ftlab.evals.generation import generate
from ftlab.models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    base = tiny_model(0, n_layer=3, d_model=32).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return base, tuned, tiny_tokenizer()


def _batch(tok):
    ids = [tok("Capital of Zorland?")["input_ids"], tok("Hi")["input_ids"]]
    T = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])  # right padding
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    return input_ids, mask


def test_tuco_alpha_one_is_the_tuned_model_bit_for_bit(models):
    base, tuned, tok = models
    ids, mask = _batch(tok)
    out = TuCoModel(base, tuned, alpha=1.0)(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = tuned(input_ids=ids, attention_mask=mask).logits
    assert out.logits.shape == ref.shape
    assert torch.equal(out.logits, ref)


def test_tuco_alpha_zero_mixes_in_base_blocks(models):
    base, tuned, tok = models
    ids, mask = _batch(tok)
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids, attention_mask=mask).logits
        # α = 0 runs the base blocks on the tuned embedding and under the tuned head: build that model by hand.
        hybrid = copy.deepcopy(base)
        hybrid.model.embed_tokens.load_state_dict(tuned.model.embed_tokens.state_dict())
        hybrid.model.norm.load_state_dict(tuned.model.norm.state_dict())
        hybrid.lm_head.load_state_dict(tuned.lm_head.state_dict())
        expected = hybrid(input_ids=ids, attention_mask=mask).logits
    out = TuCoModel(base, tuned, alpha=0.0)(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - tuned_logits).abs().max() > 1e-2
    # hooks are removed after the call: the tuned model is itself again
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=ids, attention_mask=mask).logits, tuned_logits)


def _scaled_by_hand(base, tuned, ids, mask, alpha):
    """x_{l+1} = x_l + PTC_l + α·FTC_l, block by block with the two models' decoder layers called directly.

    Returns (input of every block after the first, then the input of the final norm; logits), real positions only.
    """
    from _util import layer_inputs

    inner = tuned.model
    x, kw = layer_inputs(tuned, ids, mask)
    with torch.no_grad():
        states = []
        for layer_pt, layer_ft in zip(base.model.layers, inner.layers, strict=True):
            out_pt, out_ft = layer_pt(x, **kw), layer_ft(x, **kw)
            ptc, ftc = out_pt - x, out_ft - out_pt
            x = x + ptc + alpha * ftc
            states.append(x)
        logits = tuned.lm_head(inner.norm(x))
    real = mask.bool()
    return [h[real] for h in states], logits[real]


def test_tuco_half_scale_matches_the_hand_computed_mix(models):
    base, tuned, tok = models
    ids, mask = _batch(tok)
    want_states, want_logits = _scaled_by_hand(base, tuned, ids, mask, alpha=0.5)
    seen = []  # inputs of blocks 1..L-1 and of the final norm: the mixed output of each block
    targets = [*decoder_layers(tuned)[1:], tuned.model.norm]
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0])) for m in targets]
    try:
        out = TuCoModel(base, tuned, alpha=0.5)(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(want_states) == 3
    for got, want in zip(seen, want_states, strict=True):
        torch.testing.assert_close(got[mask.bool()], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[mask.bool()], want_logits, rtol=1e-5, atol=1e-5)
    # and it is neither end point: α = 0.5 sits strictly between the base-block (α = 0) and tuned (α = 1) mixes
    _, at_zero = _scaled_by_hand(base, tuned, ids, mask, alpha=0.0)
    _, at_one = _scaled_by_hand(base, tuned, ids, mask, alpha=1.0)
    assert (out[mask.bool()] - at_zero).abs().max() > 1e-2 and (out[mask.bool()] - at_one).abs().max() > 1e-2
    with torch.no_grad():  # the hand computation itself: at α = 1 it is the tuned model
        torch.testing.assert_close(at_one, tuned(input_ids=ids, attention_mask=mask).logits[mask.bool()])


def test_decomposition_reproduces_the_tuned_hidden_states(models):
    base, tuned, tok = models
    ids, mask = _batch(tok)
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o)) for layer in decoder_layers(tuned)]
    try:
        with torch.no_grad():
            tuned(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    parts = components(base, tuned, ids, mask)
    assert len(parts) == len(outputs) == 3
    for ell, part in enumerate(parts):
        rebuilt = part["x"] + part["ptc"] + part["ftc"]
        torch.testing.assert_close(rebuilt, outputs[ell], rtol=0, atol=1e-5)
        if ell + 1 < len(parts):
            assert torch.equal(parts[ell + 1]["x"], outputs[ell])
    same = components(base, copy.deepcopy(base), ids, mask)
    assert all(float(p["ftc"].abs().max()) == 0.0 for p in same)


def test_tuco_generates_through_the_evaluation_loop(models):
    base, tuned, tok = models
    composite = TuCoModel(base, tuned, alpha=1.0)
    assert composite.device == tuned.device
    got = generate(composite, tok, ["Hi", "Capital?"], max_new_tokens=5, progress=False)
    want = generate(tuned, tok, ["Hi", "Capital?"], max_new_tokens=5, progress=False)
    assert got == want


def test_eft_with_one_model_as_large_and_small_equals_the_tune(models):
    base, tuned, tok = models
    ids, mask = _batch(tok)
    eft = EFTModel(base, tuned, base, tokenizers=[tok, tok, tok])
    with torch.no_grad():
        ref = tuned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(eft(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=1e-5)
    # weight 0 is the large base alone; weight 2 doubles the delta
    zero = EFTModel(base, tuned, base, weight=0.0)(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        torch.testing.assert_close(zero, base(input_ids=ids, attention_mask=mask).logits)
    assert eft.device == base.device


def test_eft_up_scales_a_different_large_base(models):
    base, tuned, tok = models
    large = tiny_model(7, n_layer=4, d_model=48).eval()
    ids, mask = _batch(tok)
    out = EFTModel(large, tuned, base)(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        kw = {"input_ids": ids, "attention_mask": mask}
        want = large(**kw).logits + tuned(**kw).logits - base(**kw).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_eft_rejects_different_tokenizers(models):
    base, tuned, tok = models
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="shared tokenizer"):
        EFTModel(base, tuned, base, tokenizers=[tok, other, tok])


@pytest.fixture(scope="module")
def trio(models):
    """(large base, [two small fine-tunes], small base, tokenizer): the large base is a different, bigger model."""
    base, tuned, tok = models
    large = tiny_model(7, n_layer=4, d_model=48).eval()
    tuned2 = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned2.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return large, [tuned, tuned2], base, tok


def _log_softmax(model, ids, mask=None):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)


def test_eft_weighted_deltas_on_a_different_large_base_follow_the_log_softmax_rule(trio):
    large, (tuned, tuned2), base, tok = trio
    ids, mask = _batch(tok)
    out = EFTModel(large, [tuned, tuned2], base, weight=[0.5, -0.25])(input_ids=ids, attention_mask=mask).logits
    ls_base = _log_softmax(base, ids, mask)
    want = (
        _log_softmax(large, ids, mask)
        + 0.5 * (_log_softmax(tuned, ids, mask) - ls_base)
        - 0.25 * (_log_softmax(tuned2, ids, mask) - ls_base)
    )
    # the distributions agree at every position (raw logits and log-probabilities differ by a per-position constant)
    torch.testing.assert_close(torch.log_softmax(out, -1), torch.log_softmax(want, -1), rtol=1e-5, atol=1e-5)


def _greedy_reference(large, tuned, base, w, tok, prompt, formats, max_new):
    """EFT greedy decoding by hand: each model on its own prompt plus the shared continuation, combined at the end."""
    from ftlab.evals.generation import encode_prompts, stop_token_ids

    chat = encode_prompts(tok, [prompt])[0]
    own = {"chat": chat, "plain": tok(prompt)["input_ids"]}
    prompts = [own[f] for f in formats] if formats else [chat] * 3
    stop, out = set(stop_token_ids(None, tok)), []
    for _ in range(max_new):
        last = [
            _log_softmax(m, torch.tensor([p + out]))[0, -1] for m, p in zip((large, tuned, base), prompts, strict=True)
        ]
        nxt = int((last[0] + w * (last[1] - last[2])).argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("formats", [None, ["plain", "chat", "plain"]])
def test_eft_generation_decodes_the_combined_distribution(trio, formats):
    large, (tuned, _), base, tok = trio
    prompts = ["Hi", "Capital of Zorland?"]
    eft = EFTModel(large, tuned, base, weight=0.5, formats=formats, tokenizer=tok)
    got = generate(eft, tok, prompts, max_new_tokens=6, progress=False)
    want = [_greedy_reference(large, tuned, base, 0.5, tok, p, formats, 6) for p in prompts]
    assert got == want


def test_eft_formats_give_each_model_its_own_prompt(trio):
    from ftlab.evals.generation import encode_prompts

    large, (tuned, _), base, tok = trio
    template = "# Q: {prompt}\n# A:"
    prompts = ["Hi", "Capital of Zorland?"]
    chat = encode_prompts(tok, prompts)
    cont = tok("Ok")["input_ids"]
    plain_row = tok("Just text")["input_ids"]  # not chat-templated (as log-likelihood scoring sends)
    rows = [chat[0] + cont, chat[1], plain_row]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, a, kw, n=n: seen.setdefault(n, []).append(kw["input_ids"]), with_kwargs=True
        )
        for n, m in (("large", large), ("tuned", tuned), ("base", base))
    ]
    try:
        eft = EFTModel(large, tuned, base, weight=0.5, formats=["plain", "chat", template], tokenizer=tok)
        out = eft(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    expected = {
        "large": [tok(p)["input_ids"] for p in prompts],
        "tuned": chat,
        "base": [tok(template.replace("{prompt}", p))["input_ids"] for p in prompts],
    }
    for name, own in expected.items():
        (got,) = seen[name]
        want_rows = [own[0] + cont, own[1], plain_row]
        assert [got[r, : len(x)].tolist() for r, x in enumerate(want_rows)] == want_rows, name
        assert all(int(got[r, len(x) :].abs().sum()) == 0 for r, x in enumerate(want_rows)), name  # right padding
    # logits: aligned on the continuation, NaN inside the reformatted prompts
    for r in range(len(prompts)):
        n, lc = len(rows[r]), len(chat[r])
        seqs = [expected[k][r] + rows[r][lc:] for k in ("large", "tuned", "base")]
        lp = [_log_softmax(m, torch.tensor([s]))[0] for m, s in zip((large, tuned, base), seqs, strict=True)]
        k = n - lc + 1  # positions from the last prompt token on
        want = lp[0][-k:] + 0.5 * (lp[1][-k:] - lp[2][-k:])
        torch.testing.assert_close(torch.log_softmax(out[r, lc - 1 : n], -1), torch.log_softmax(want, -1))
        assert bool(out[r, : lc - 1].isnan().all())
    # a row without the chat template goes to every model unchanged
    plain = EFTModel(large, tuned, base, weight=0.5)(input_ids=ids[2:], attention_mask=mask[2:]).logits
    torch.testing.assert_close(out[2, : len(plain_row)], plain[0, : len(plain_row)])


def test_eft_formats_are_checked(trio):
    large, (tuned, _), base, tok = trio
    with pytest.raises(ValueError, match="one entry per model"):
        EFTModel(large, tuned, base, formats=["plain", "chat"], tokenizer=tok)
    with pytest.raises(ValueError, match="neither"):
        EFTModel(large, tuned, base, formats=["plain", "chat", "markdown"], tokenizer=tok)
    with pytest.raises(ValueError, match="needs tokenizer"):
        EFTModel(large, tuned, base, formats=["plain", "chat", "plain"])
    assert EFTModel(large, tuned, base, formats=["input"] * 3).formats is None  # the caller's ids: the default
