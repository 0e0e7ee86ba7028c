"""Mixtures follow their weights exactly and deterministically; DMT's stage 2 replays exactly k of each set."""

from __future__ import annotations

from collections import Counter

import pytest

from ftlab.data.mixing import dmt_stages, mix


def source(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}-{i}", "completion": tag, "src": tag} for i in range(n)]


def test_mixture_draws_in_its_weights():
    a, b, c = source("a", 500), source("b", 500), source("c", 500)
    out = mix([a, b, c], [0.5, 0.3, 0.2], n=301, seed=0)
    counts = Counter(r["src"] for r in out)
    assert counts == {"a": 151, "b": 90, "c": 60}  # 150.5 / 90.3 / 60.2: largest remainder gives a the extra one
    assert len({r["prompt"] for r in out}) == 301  # no record repeats while a source lasts


def test_mixture_is_deterministic_and_shuffled():
    a, b = source("a", 50), source("b", 50)
    first = mix([a, b], [1, 1], n=40, seed=7)
    assert first == mix([a, b], [1, 1], n=40, seed=7)
    assert first != mix([a, b], [1, 1], n=40, seed=8)
    assert [r["src"] for r in first] != ["a"] * 20 + ["b"] * 20  # interleaved, not concatenated


def test_default_size_uses_the_limiting_source_once():
    stage, replay = source("new", 90), source("old", 1000)
    out = mix([stage, replay], [0.9, 0.1], seed=0)
    counts = Counter(r["src"] for r in out)
    assert counts == {"new": 90, "old": 10}


def test_small_source_is_replayed_with_even_repetition():
    small, big = source("s", 3), source("b", 100)
    out = mix([small, big], [1, 1], n=20, seed=0)
    reps = Counter(r["prompt"] for r in out if r["src"] == "s")
    assert sorted(reps.values()) == [3, 3, 4]  # 10 draws of 3 records: whole passes, then a partial one


def test_zero_weight_source_is_left_out_and_bad_weights_fail():
    out = mix([source("a", 10), []], [1, 0], n=5, seed=0)
    assert {r["src"] for r in out} == {"a"}
    with pytest.raises(ValueError, match="weights"):
        mix([source("a", 10)], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        mix([source("a", 10), source("b", 10)], [1, -1])
    with pytest.raises(ValueError, match="empty"):
        mix([source("a", 10), []], [1, 1])


@pytest.mark.parametrize("k", [1 / 256, 1 / 16, 0.25, 1.0])
def test_dmt_stage2_holds_all_general_and_round_k_of_each_set(k):
    math, code, general = source("math", 1000), source("code", 300), source("gen", 200)
    stage1, stage2 = dmt_stages([math, code], general, k=k, seed=0)
    assert Counter(r["prompt"] for r in stage1) == Counter(r["prompt"] for r in math + code)
    counts = Counter(r["src"] for r in stage2)
    assert counts["gen"] == 200 and {r["prompt"] for r in general} <= {r["prompt"] for r in stage2}
    assert counts["math"] == round(k * 1000) and counts["code"] == round(k * 300)
    assert len(stage2) == len({r["prompt"] for r in stage2})  # a subset, no repeats


def test_dmt_subset_is_fixed_by_the_seed():
    math, general = source("math", 512), source("gen", 10)
    pick = lambda s: {r["prompt"] for r in s if r["src"] == "math"}  # noqa: E731
    one = pick(dmt_stages([math], general, k=1 / 16, seed=3)[1])
    assert one == pick(dmt_stages([math], general, k=1 / 16, seed=3)[1])
    assert one != pick(dmt_stages([math], general, k=1 / 16, seed=4)[1])
    assert len(one) == 32
