"""The evaluation speed paths keep their answers: prompts sorted by length come back in the caller's order, and
multiple choice scored over a shared context's KV cache gives the scores of one sequence per option."""

from __future__ import annotations

import pytest
import torch

from ftlab.evals import loglik
from ftlab.evals.generation import encode_prompts, generate
from ftlab.evals.loglik import choice_logliks, pick_choice
from ftlab.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Lengths deliberately out of order, so sorting by length reorders them.
PROMPTS = ["x", "Tell me a long story about a dragon and a knight.", "Hi", "What is the capital of France?", "2+2?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5).eval()


def test_sorted_batches_return_answers_in_the_callers_order(model, tok):
    lengths = [len(x) for x in encode_prompts(tok, PROMPTS)]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)
    batched = generate(model, tok, PROMPTS, batch_size=2, max_new_tokens=8, progress=False)
    one_by_one = [generate(model, tok, [p], batch_size=1, max_new_tokens=8, progress=False)[0] for p in PROMPTS]
    assert batched == one_by_one
    assert len(set(batched)) > 1  # the prompts' answers differ, so a permutation would show


ITEMS = [
    {"prompt": "Question: why is the sky blue?\nAnswer:", "choices": ["because of scattering", "no", "it is not"]},
    {"prompt": "Q: 2+2?\nA:", "choices": ["four", "five apples", "22"]},
    {
        "prompt": "The longest prompt of them all, with many words before the options.\nAnswer:",
        "choices": ["yes indeed", "maybe so", "no way at all", "x"],
    },  # fmt: skip
    {"prompt": "Pick:", "choices": ["a", "b"]},  # single-token options: one forward of the context
]


def test_shared_context_scores_equal_one_sequence_per_option(model, tok, monkeypatch):
    shared = choice_logliks(model, tok, ITEMS, batch_size=3)
    monkeypatch.setattr(loglik, "SHARE_CONTEXT", False)
    separate = choice_logliks(model, tok, ITEMS, batch_size=3)
    for a, b in zip(shared, separate, strict=True):
        assert [nb for _, nb in a] == [nb for _, nb in b]
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
        for norm in (False, True):
            assert pick_choice(a, norm) == pick_choice(b, norm)
    spread = [max(ll for ll, _ in s) - min(ll for ll, _ in s) for s in separate]
    assert min(spread) > 1e-3  # the options score differently, so a swapped or shifted score would show


def test_shared_context_runs_each_context_once(model, tok):
    """One forward over the contexts of a batch of items and one over all their options."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        choice_logliks(model, tok, ITEMS[:3], batch_size=3)
    finally:
        handle.remove()
    n_options = sum(len(i["choices"]) for i in ITEMS[:3])
    assert [s[0] for s in calls] == [3, n_options]
    assert calls[0][1] == max(len(tok(i["prompt"])["input_ids"]) for i in ITEMS[:3])


def test_logits_callable_keeps_one_sequence_per_option(model, tok):
    class Bare(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    bare = choice_logliks(Bare(model), tok, ITEMS, batch_size=3)
    hf = choice_logliks(model, tok, ITEMS, batch_size=3)
    for a, b in zip(bare, hf, strict=True):
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
