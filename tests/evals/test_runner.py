"""The runner on tiny models: batching never changes results, logits callables match HF models, log-likelihoods
and perplexity match hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ftlab.evals.generation import common_prefix_len, encode_prompts, generate
from ftlab.evals.loglik import choice_logliks, text_nll
from ftlab.evals.runner import evaluate
from ftlab.evals.suites import Suite
from ftlab.models import tiny_model, tiny_tokenizer

PROMPTS = ["Hi", "What is the capital of France?", "2+2?", "Tell me a story about a dragon.", "x", "Why?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).eval()


class LogitsWrapper(torch.nn.Module):
    """A bare logits callable around an HF model (what EFT / TuCo composites look like to the runner)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class ChainModel(torch.nn.Module):
    """A fake LM whose next token depends only on the current one, through a fixed transition table."""

    def __init__(self, tok, chain: dict[str, str], default: str):
        super().__init__()
        vocab = tok.get_vocab()
        table = torch.full((len(vocab), len(vocab)), -10.0)
        table[:, vocab[default]] = 10.0
        for src, dst in chain.items():
            table[vocab[src]] = -10.0
            table[vocab[src], vocab[dst]] = 10.0
        self.register_buffer("table", table)

    @property
    def device(self):
        return self.table.device

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table[input_ids]})()  # (B, T, V)


def test_batched_generation_equals_one_at_a_time(model, tok):
    batched = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=12, progress=False)
    single = generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12, progress=False)
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)  # real, prompt-dependent text, not empty strings


def test_cached_loop_matches_hf_generate_when_rows_stop_early(model, tok):
    # Our KV-cache loop drops finished rows from the batch; it must still give exactly what model.generate gives.
    from ftlab.evals.generation import _generate_cached, _generate_hf

    batch = encode_prompts(tok, PROMPTS)
    free = _generate_hf(model, batch, 9, [], tok.pad_token_id)
    # Stop on the third token of the first row: rows that produce it stop early, the rest run to the cap.
    stop = [free[0][2]]
    want = _generate_hf(model, batch, 9, stop, tok.pad_token_id)
    lengths = sorted(len(w) for w in want)
    assert lengths[0] < 9 and lengths[-1] == 9  # the case really mixes early-stopping and full-length rows
    assert _generate_cached(model, batch, 9, stop, tok.pad_token_id) == want
    assert _generate_cached(model, batch, 9, [], tok.pad_token_id) == free
    # The shared chat-template prefix run once and repeated over the rows changes nothing.
    prefix = common_prefix_len(batch)
    assert tok.decode(batch[0][:prefix]) == "<|im_start|>user\n"
    assert _generate_cached(model, batch, 9, stop, tok.pad_token_id, prefix_len=prefix) == want


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3]]) == 2  # one token is always left after the prefix
    assert common_prefix_len([[7], [7, 8]]) == 0
    assert common_prefix_len([]) == 0


def test_logits_callable_matches_hf_generate(model, tok):
    hf = generate(model, tok, PROMPTS, batch_size=3, max_new_tokens=10, progress=False)
    wrapped = generate(LogitsWrapper(model), tok, PROMPTS, batch_size=3, max_new_tokens=10, progress=False)
    single = generate(LogitsWrapper(model), tok, PROMPTS, batch_size=1, max_new_tokens=10, progress=False)
    assert wrapped == hf == single


def test_generation_stops_at_end_of_turn(tok):
    # The chat prompt ends in "\n"; the chain then writes "abc" and the end-of-turn token.
    fake = ChainModel(tok, {"\n": "a", "a": "b", "b": "c", "c": "<|im_end|>"}, default="q")
    for bs in (1, 4):
        assert generate(fake, tok, PROMPTS, batch_size=bs, max_new_tokens=20, progress=False) == ["abc"] * 6


def test_generation_respects_max_new_tokens(tok):
    fake = ChainModel(tok, {}, default="q")
    assert generate(fake, tok, ["Hi", "Hello"], max_new_tokens=5, progress=False) == ["qqqqq"] * 2


def test_chat_template_is_used(tok):
    ids = encode_prompts(tok, ["Hi"])[0]
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(encode_prompts(tok, ["Hi"], chat=False)[0]) == "Hi"


def test_choice_picks_the_likely_option(tok):
    fake = ChainModel(tok, {" ": "a", "a": "b", "b": "c"}, default="q")
    items = [
        {"id": "right-first", "prompt": "Question: q\nAnswer:", "choices": ["abc", "xyz"], "answer": 0},
        {"id": "right-second", "prompt": "Question: q\nAnswer:", "choices": ["zzz", "abc", "qqq"], "answer": 1},
        {"id": "wrong-key", "prompt": "Question: q\nAnswer:", "choices": ["abc", "xyz"], "answer": 1},
    ]
    result = evaluate(fake, tok, Suite("mc", "choice", items), batch_size=2, progress=False)
    assert [r.score for r in result.items] == [1.0, 1.0, 0.0]
    assert [r.output for r in result.items] == ["abc", "abc", "abc"]
    assert result.score == pytest.approx(2 / 3)


def test_choice_loglik_matches_hand_computation(model, tok):
    item = {"prompt": "Question: why?\nAnswer:", "choices": ["because", "no"], "answer": 0}
    got = choice_logliks(model, tok, [item], batch_size=2)[0]
    for (ll, nbytes), choice in zip(got, item["choices"], strict=True):
        ctx = tok(item["prompt"])["input_ids"]
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        want = sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
        assert nbytes == len(" " + choice)


def test_single_token_options_share_one_forward(model, tok):
    # MMLU-style letters: with a tokenizer that makes " A" one token, all options come from one forward of the
    # context, and must equal the log-probabilities a full forward gives.
    class LetterTok:
        def __call__(self, text, add_special_tokens=True):
            if not add_special_tokens and text.strip() in "ABCD" and len(text) == 2:
                return {"input_ids": [tok.get_vocab()[text.strip()]]}
            return tok(text, add_special_tokens=add_special_tokens)

        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

    item = {"prompt": "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:", "choices": ["A", "B", "C", "D"], "answer": 2}
    got = choice_logliks(model, LetterTok(), [item])[0]
    ctx = torch.tensor([tok(item["prompt"])["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ctx).logits[0, -1].log_softmax(-1)
    want = [float(logp[tok.get_vocab()[c]]) for c in "ABCD"]
    assert [ll for ll, _ in got] == pytest.approx(want, abs=1e-5)
    assert [nb for _, nb in got] == [2, 2, 2, 2]


def test_choice_norm_divides_by_length(tok):
    # Each option token scores log(1/V)-ish under a flat model, so the longer option loses on the sum
    # but ties on the per-byte average; ties go to the first option.
    class Flat(ChainModel):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.table.shape[0])})()

    flat = Flat(tok, {}, default="q")
    items = [{"id": "0", "prompt": "Q:", "choices": ["abcdef", "ab"], "answer": 0}]
    assert evaluate(flat, tok, Suite("s", "choice", items), progress=False).score == 0.0
    assert evaluate(flat, tok, Suite("s", "choice_norm", items), progress=False).score == 1.0


def test_perplexity_matches_hand_computation(model, tok):
    texts = ["The cat sat on the mat.", "Rain falls on the plain, mostly."]
    result = evaluate(model, tok, Suite("ppl", "perplexity", [{"id": str(i), "text": t} for i, t in enumerate(texts)]))
    total_nll, total_tokens = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        total_nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        total_tokens += ids.shape[1] - 1
    assert result.score == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert result.higher_is_better is False and result.metric == "perplexity" and result.n == 2


def test_perplexity_windows_score_every_token_once(model, tok):
    text = "A fairly long sentence that needs several windows of eight tokens each."
    ((nll_full, n_full),) = text_nll(model, tok, [text], max_length=512)
    ((nll_win, n_win),) = text_nll(model, tok, [text], max_length=8)
    assert n_full == n_win == len(tok(text)["input_ids"]) - 1
    assert nll_win != pytest.approx(nll_full)  # shorter context changes the numbers, not the token count


def test_evaluate_batched_equals_sequential_rows(model, tok):
    items = [{"id": str(i), "prompt": p, "answer": ["a"]} for i, p in enumerate(PROMPTS)]
    suite = Suite("qa", "contains", items, max_new_tokens=6)
    a = evaluate(model, tok, suite, batch_size=16, progress=False)
    b = evaluate(model, tok, suite, batch_size=1, progress=False)
    assert [r.output for r in a.items] == [r.output for r in b.items]
    assert a.to_dict() == b.to_dict()
    assert set(a.to_dict()) == {"metric", "score", "n", "stderr"} and a.n == len(PROMPTS)


def test_training_mode_is_off_during_evaluation_and_restored(model, tok):
    seen = []

    class Spy(LogitsWrapper):
        def forward(self, input_ids, attention_mask):
            seen.append(self.training)
            return super().forward(input_ids, attention_mask)

    spy = Spy(model).train()
    items = [{"id": "0", "prompt": "Hi", "answer": ["x"]}]
    evaluate(spy, tok, Suite("qa", "contains", items, max_new_tokens=3), progress=False)
    evaluate(spy, tok, Suite("ppl", "perplexity", [{"id": "0", "text": "Some text."}]), progress=False)
    assert seen and not any(seen)
    assert spy.training and model.training
    model.eval()


def test_peft_model_generates_like_its_base(tok):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(seed=3).eval()
    # LoRA's B matrix starts at zero, so the wrapped model computes exactly the base function.
    peft_model = get_peft_model(tiny_model(seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    want = generate(base, tok, PROMPTS, batch_size=4, max_new_tokens=8, progress=False)
    assert generate(peft_model, tok, PROMPTS, batch_size=4, max_new_tokens=8, progress=False) == want
