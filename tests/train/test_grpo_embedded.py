"""The embedded model earns GRPO signal on the shipped arithmetic task (slow: loads SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch

from ftlab.tasks import arithmetic_task
from ftlab.train.grpo import GRPOSettings, prompt_of, rif_filter, sample_rollouts
from ftlab.train.rewards import numeric_reward

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    from ftlab.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def test_base_passes_the_task_greedily_but_not_always_when_sampling(embedded):
    model, tok = embedded
    recs = arithmetic_task(21, split="test")
    texts = [tok.apply_chat_template(prompt_of(r, tok), add_generation_prompt=True, tokenize=False) for r in recs]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    replies = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    greedy = sum(numeric_reward(c, r["answer"]) for c, r in zip(replies, recs, strict=True)) / len(recs)
    assert 0.5 <= greedy <= 1.0, replies
    grpo = GRPOSettings(rif_rollouts=4, rif_batch_size=21)
    _, info = rif_filter(recs, tok, sample_rollouts(model, tok, grpo, seed=0), grpo)
    counts = info["correct_counts"]
    mixed = sum(0 < c < 4 for c in counts) / len(counts)
    assert mixed >= 0.25, counts  # enough groups with reward variance for GRPO to learn from
