"""Base scores of the embedded SmolLM2-135M-Instruct on built-in and real suites (slow: minutes on a CPU).

Real data comes from /work/shared/data (ARC, WikiText-2, MMLU, IFEval); those tests skip when it is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ftlab.evals import evaluate, load_suite

pytestmark = pytest.mark.slow
DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def embedded():
    from ftlab.models import load_model

    return load_model("smollm2-135m-instruct")


def _score(embedded, ref: str, limit: int | None = None, **kw) -> float:
    model, tok = embedded
    return evaluate(model, tok, load_suite(ref, limit=limit, **kw), progress=False).score


def test_world_facts_well_above_chance(embedded):
    assert _score(embedded, "world-facts") > 0.3


def test_fictional_capitals_unknown_before_training(embedded):
    assert _score(embedded, "fictional-capitals") <= 0.05


def test_general_text_perplexity_is_sane(embedded):
    assert 5 < _score(embedded, "general-text") < 100


def test_batched_equals_sequential_on_world_facts(embedded):
    model, tok = embedded
    suite = load_suite("world-facts", limit=48)
    batched = evaluate(model, tok, suite, batch_size=16, progress=False)
    single = evaluate(model, tok, suite, batch_size=1, progress=False)
    assert [r.output for r in batched.items] == [r.output for r in single.items]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_arc_easy_dev_above_chance(embedded):
    assert _score(embedded, str(_need(DATA / "arc/ARC-Easy-Dev.jsonl")), limit=200) > 0.3


def test_wikitext_perplexity_finite(embedded):
    ppl = _score(embedded, str(_need(DATA / "wikitext2/wiki.test.raw")), limit=50)
    assert math.isfinite(ppl) and 1 < ppl < 200


def test_mmlu_dev_folder_scores(embedded):
    acc = _score(embedded, str(_need(DATA / "mmlu/dev")), limit=100)
    assert 0.0 <= acc <= 1.0


def test_ifeval_prompts_are_checked(embedded):
    model, tok = embedded
    suite = load_suite(str(_need(DATA / "ifeval/input_data.jsonl")), limit=20)
    result = evaluate(model, tok, suite, max_new_tokens=128, progress=False)
    assert result.n == 20 and 0.0 <= result.score <= 1.0
