"""The generated arithmetic task: right answers, disjoint splits, deterministic per seed, valid verifiable records."""

from __future__ import annotations

import re

import pytest

from ftlab.data.records import validate
from ftlab.tasks import arithmetic_task
from ftlab.train.rewards import REWARDS


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_answers_are_right_and_records_are_verifiable(op):
    for r in arithmetic_task(10, seed=1, op=op):
        validate(r, "verifiable", "task")
        a, b = map(int, re.match(r"What is (\d+) . (\d+)\?", r["prompt"]).groups())
        assert int(r["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
        assert REWARDS[r["reward"]](f"The answer is {r['answer']}.", r["answer"]) == 1.0


def test_splits_are_disjoint_and_seeds_reorder():
    train = arithmetic_task(79, split="train")
    test = arithmetic_task(21, split="test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train + test}) == 100  # every 0-9 pair, each in one split
    assert arithmetic_task(5, seed=2) == arithmetic_task(5, seed=2) != arithmetic_task(5, seed=3)
    with pytest.raises(ValueError, match="has 21"):
        arithmetic_task(30, split="test")
