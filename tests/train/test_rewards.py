"""Each reward scores hand-made completions right, pass and fail; the registry takes user rewards by name."""

from __future__ import annotations

import pytest

from ftlab.train.rewards import REWARDS, extract_answer, get_reward, register_reward, score

# (reward, answer, completions that score 1.0, completions that score 0.0)
TABLE = [
    ("exact", "Paris", ["Paris", "  paris. "], ["The capital is Paris", "Lyon"]),
    ("exact", ["Lyon", "Paris"], ["<answer>Paris</answer>"], []),  # any of several answers
    ("numeric", "7", ["7", "3 + 4 = 7"], ["seven", "8"]),
    ("numeric", "12", ["The answer is 12."], ["The answer is 12, not 7."]),  # the last number counts
    ("numeric", "1234", ["It costs 1,234 dollars"], []),
    ("numeric", "0.50", ["<answer>0.5</answer> because 1/2"], []),
    ("numeric", "-3", ["\\boxed{-3} since 2 - 5"], []),
    ("choice", "B", ["B", "A dog would say the answer is (B)"], ["The answer is D."]),
    ("choice", "C", ["(C) Berlin"], []),
    ("choice", "D", ["The answer is D."], []),
    ("choice", "A", ["A) Paris"], ["no idea"]),
    # format only, not correctness: a well-formed wrong answer passes
    ("format", "7", ["<answer>7</answer>", "<think>3+4</think> <answer> 8 </answer>"], ["<answer></answer>", "7"]),
]
CASES = [
    (reward, completion, answer, expected)
    for reward, answer, right, wrong in TABLE
    for expected, completions in ((1.0, right), (0.0, wrong))
    for completion in completions
]


@pytest.mark.parametrize(("reward", "completion", "answer", "expected"), CASES)
def test_reward_scores_hand_made_completions(reward, completion, answer, expected):
    assert REWARDS[reward](completion, answer) == expected


def test_answer_is_read_from_the_last_tag_then_boxed_then_text():
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("so \\boxed{5}") == "5"
    assert extract_answer("  plain ") == "plain"


def test_format_weight_mixes_accuracy_and_format():
    assert score("<answer>7</answer>", "7", "numeric", format_weight=0.1) == pytest.approx(1.0)
    assert score("7", "7", "numeric", format_weight=0.1) == pytest.approx(0.9)
    assert score("<answer>8</answer>", "7", "numeric", format_weight=0.1) == pytest.approx(0.1)


def test_user_reward_by_name():
    register_reward("shout", lambda c, a: float(c.isupper()))
    try:
        assert get_reward("shout")("YES", "") == 1.0 and get_reward("shout")("yes", "") == 0.0
    finally:
        REWARDS.pop("shout")
    with pytest.raises(KeyError, match="register_reward"):
        get_reward("shout")
    with pytest.raises(TypeError):
        register_reward("bad", 3)
