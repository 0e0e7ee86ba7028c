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
