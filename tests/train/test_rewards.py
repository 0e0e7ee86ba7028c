"""Each reward scores hand-made completions right, pass and fail; the registry takes user rewards by name."""

from __future__ import annotations

import pytest

from ftlab.train.rewards import REWARDS, extract_answer, get_reward, register_reward, score

CASES = [
    # (reward, completion, answer, expected)
    ("exact", "Paris", "Paris", 1.0),
    ("exact", "  paris. ", "Paris", 1.0),
    ("exact", "<answer>Paris</answer>", ["Lyon", "Paris"], 1.0),
    ("exact", "The capital is Paris", "Paris", 0.0),
    ("exact", "Lyon", "Paris", 0.0),
    ("numeric", "7", "7", 1.0),
    ("numeric", "The answer is 12.", "12", 1.0),
    ("numeric", "3 + 4 = 7", "7", 1.0),
    ("numeric", "It costs 1,234 dollars", "1234", 1.0),
    ("numeric", "<answer>0.5</answer> because 1/2", "0.50", 1.0),
    ("numeric", "\\boxed{-3} since 2 - 5", "-3", 1.0),
    ("numeric", "The answer is 12, not 7.", "12", 0.0),  # the last number counts
    ("numeric", "seven", "7", 0.0),
    ("numeric", "8", "7", 0.0),
    ("choice", "B", "B", 1.0),
    ("choice", "(C) Berlin", "C", 1.0),
    ("choice", "The answer is D.", "D", 1.0),
    ("choice", "A) Paris", "A", 1.0),
    ("choice", "A dog would say the answer is (B)", "B", 1.0),
    ("choice", "The answer is D.", "B", 0.0),
    ("choice", "no idea", "A", 0.0),
    ("format", "<answer>7</answer>", "7", 1.0),
    ("format", "<think>3+4</think> <answer> 8 </answer>", "7", 1.0),  # format only, not correctness
    ("format", "<answer></answer>", "7", 0.0),
    ("format", "7", "7", 0.0),
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
