"""Masked Thought: only response inputs are replaced, at the scheduled rate; labels and prompts are untouched."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ftlab.data.masked_thought import MaskedThoughtCollator, add_mask_token
from ftlab.data.tokenize import IGNORE
from ftlab.models import tiny_model, tiny_tokenizer

PROMPT_LEN, RESPONSE_LEN = 20, 200


def examples(tok, n: int = 16) -> list[dict]:
    """Prompt of 20 tokens (label -100) + response of 200 tokens; lengths differ so the batch is padded."""
    out = []
    for i in range(n):
        prompt = tok(f"question {i}: " + "q" * 40, add_special_tokens=False)["input_ids"][:PROMPT_LEN]
        response = tok(("the answer is " * 30)[: RESPONSE_LEN - i], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response})
    return out


def plain(tok, exs):
    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(exs)


@pytest.mark.parametrize("replace", ["pad", "random"])
def test_masks_only_response_inputs_at_the_ratio(replace):
    tok = tiny_tokenizer()
    exs = examples(tok)
    ref = plain(tok, exs)
    col = MaskedThoughtCollator(tok, ratio=0.3, replace=replace, warmup_ratio=0.0, seed=1)
    out = col(exs)
    assert torch.equal(out["labels"], ref["labels"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])  # replaced positions stay attended
    changed = out["input_ids"] != ref["input_ids"]
    response = ref["labels"] != IGNORE
    assert changed[~response].sum() == 0  # prompt and padding: exactly zero
    frac = changed[response].float().mean().item()
    # 3000+ response tokens: std of the fraction ~0.008; random replacement can redraw the same token (1/95 here)
    assert abs(frac - 0.3) < 0.04, frac
    if replace == "pad":
        assert (out["input_ids"][changed] == tok.pad_token_id).all()
    else:
        assert not set(out["input_ids"][changed].tolist()) & set(tok.all_special_ids)


def test_masks_are_redrawn_per_batch_and_reproducible_by_seed():
    tok = tiny_tokenizer()
    exs = examples(tok, 4)
    a = MaskedThoughtCollator(tok, ratio=0.5, replace="pad", warmup_ratio=0.0, seed=3)
    first, second = a(exs)["input_ids"], a(exs)["input_ids"]
    assert not torch.equal(first, second)
    b = MaskedThoughtCollator(tok, ratio=0.5, replace="pad", warmup_ratio=0.0, seed=3)
    assert torch.equal(b(exs)["input_ids"], first)


def test_rate_ramps_over_two_thirds_of_the_steps_like_the_paper():
    tok = tiny_tokenizer()
    col = MaskedThoughtCollator(tok, ratio=0.2, total_steps=30, grad_accum=2)
    assert col.rate(0) == 0.0
    assert col.rate(10) == pytest.approx(0.2 * 10 / (30 * 2 / 3 + 1))
    assert col.rate(25) == 0.2
    exs = examples(tok, 2)
    for _ in range(3):
        col(exs)
    assert col.step == 1  # 3 batches with grad_accum 2: the next batch is still step 1
    with pytest.raises(ValueError, match="total_steps"):
        MaskedThoughtCollator(tok).rate(1)


def test_zero_rate_at_step_zero_leaves_inputs_unchanged():
    tok = tiny_tokenizer()
    exs = examples(tok, 4)
    out = MaskedThoughtCollator(tok, ratio=0.4, total_steps=10)(exs)
    assert torch.equal(out["input_ids"], plain(tok, exs)["input_ids"])


def test_mask_token_is_added_with_the_average_embedding():
    model, tok = tiny_model(), tiny_tokenizer()
    old = model.get_input_embeddings().weight.detach().clone()
    mask_id = add_mask_token(model, tok, "<mask>")
    emb = model.get_input_embeddings().weight
    assert mask_id == old.shape[0] and emb.shape[0] == old.shape[0] + 1
    assert torch.allclose(emb[mask_id], old.mean(dim=0))
    assert torch.equal(emb[: old.shape[0]], old)
    out = MaskedThoughtCollator(tok, ratio=1.0, replace="<mask>", warmup_ratio=0.0)(examples(tok, 2))
    assert ((out["input_ids"] == mask_id) == (out["labels"] != IGNORE)).all()
    with pytest.raises(ValueError, match="add_mask_token"):
        MaskedThoughtCollator(tiny_tokenizer(), replace="<nope>")


def test_trainer_syncs_the_schedule(tmp_path):
    """Through train_sft: the callback sets total steps and grad_accum, and batch k is masked at step k // accum."""
    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.train.sft import train_sft

    model, tok = tiny_model(), tiny_tokenizer()
    data = Dataset.from_list(examples(tok, 16))
    col = MaskedThoughtCollator(tok, ratio=0.2, replace="random", seed=0)
    seen = []
    call = col.__call__

    class Spy:
        def __call__(self, exs):
            seen.append((col.step, col.rate()))
            return call(exs)

    train = TrainConfig(lr=1e-3, max_steps=3, batch_size=2, grad_accum=2, logging_steps=1)
    full = MethodConfig("full")
    train_sft(model, tok, data, full, train, tmp_path / "w", data_collator=Spy(), callbacks=[col.callback()])
    assert col.total_steps == 3 and col.grad_accum == 2
    steps = [s for s, _ in seen[:6]]
    assert steps == [0, 0, 1, 1, 2, 2]
    assert [r for _, r in seen[:6:2]] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3])
