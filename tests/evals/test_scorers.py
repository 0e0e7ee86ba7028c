"""Table-driven pass/fail cases for every scorer and every instruction rule."""

from __future__ import annotations

import math

import pytest

from ftlab.evals.rules import RULES, check_rules, count_sentences, count_words, validate_rule
from ftlab.evals.scorers import (
    GENERATIVE_SCORERS,
    contains,
    exact_match,
    last_number,
    mean_stderr,
    normalize,
    numeric_match,
    perplexity_stderr,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  Brasília  ", "brasilia"),
        ("An apple, a day", "apple day"),
        ("It's 3.5 m.", "it s 3.5 m"),
    ],
)
def test_normalize(text, want):
    assert normalize(text) == want


@pytest.mark.parametrize(
    ("output", "answer", "want"),
    [
        ("Paris", "Paris", 1.0),
        ("paris.", ["Lyon", "Paris"], 1.0),
        ("The Paris", "paris", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("The capital of France is Paris.", "Paris", 0.0),
        ("Pariss", "Paris", 0.0),
    ],
)
def test_exact_match(output, answer, want):
    assert exact_match(output, answer) == want


@pytest.mark.parametrize(
    ("output", "answer", "want"),
    [
        ("The capital of France is Paris.", "Paris", 1.0),
        ("It is Brasília.", ["Brasilia"], 1.0),
        ("Leonardo da Vinci painted it", ["da Vinci"], 1.0),
        ("William Shakespeare wrote it", ["Shakespeare"], 1.0),
        ("It was Romeo.", "Rome", 0.0),
        ("I do not know.", ["Paris", "Lyon"], 0.0),
        ("Anything at all", "a", 0.0),  # an answer that normalises to nothing never matches
    ],
)
def test_contains(output, answer, want):
    assert contains(output, answer) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is 42.", 42.0),
        ("23 + 45 = 68", 68.0),
        ("It costs 1,234 dollars", 1234.0),
        ("about -3.5 degrees", -3.5),
        ("\u22127 below", -7.0),
        ("three quarters is 3/4", 0.75),
        ("first 10 then 20", 20.0),
        ("no numbers here", None),
        ("model v2 only", None),
    ],
)
def test_last_number(text, want):
    assert last_number(text) == want


@pytest.mark.parametrize(
    ("output", "answer", "want"),
    [
        ("66 plus 24 is 90.", "90", 1.0),
        ("90.0", "90", 1.0),
        ("The result is 1,000", ["999", "1000"], 1.0),
        ("23 + 45 = 108", "68", 0.0),
        ("ninety", "90", 0.0),
        ("", "0", 0.0),
    ],
)
def test_numeric_match(output, answer, want):
    assert numeric_match(output, answer) == want


def test_generative_scorer_table_reads_the_item():
    item = {"answer": ["Paris"], "rules": [{"type": "lowercase"}]}
    assert GENERATIVE_SCORERS["contains"](item, "It is Paris") == 1.0
    assert GENERATIVE_SCORERS["exact"](item, "It is Paris") == 0.0
    assert GENERATIVE_SCORERS["numeric"]({"answer": "7"}, "seven is 7") == 1.0
    assert GENERATIVE_SCORERS["rules"](item, "all lower") == 1.0
    assert GENERATIVE_SCORERS["rules"](item, "Not lower") == 0.0


# (rule, passing output, failing output) for every rule type.
RULE_CASES = [
    ({"type": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"type": "uppercase"}, "STOP NOW!", "STOP now!"),
    ({"type": "min_words", "n": 3}, "one two three", "one two"),
    ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"type": "min_sentences", "n": 2}, "A cat. A dog.", "A cat and a dog."),
    ({"type": "max_sentences", "n": 1}, "Just one sentence here.", "One. Two."),
    ({"type": "exact_sentences", "n": 2}, "It rains. Clouds drop water!", "It rains. Clouds drop water. Then sun."),
    ({"type": "exact_bullets", "n": 2}, "- apple\n- pear", "- apple\n- pear\n- fig"),
    ({"type": "min_bullets", "n": 2}, "* a\n* b\n* c", "* a only"),
    ({"type": "include_words", "words": ["tree", "green"]}, "A green Tree.", "A green bush."),
    ({"type": "forbid_words", "words": ["hot"]}, "The sun shines; it is a photon source.", "The sun is hot."),
    ({"type": "word_frequency", "word": "apple", "n": 2}, "apple and Apple", "apple and pear"),
    ({"type": "word_frequency", "word": "x", "n": 2, "relation": "less than"}, "x", "x x"),
    ({"type": "letter_frequency", "letter": "z", "n": 2}, "Zigzag", "Zag"),
    ({"type": "json"}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ({"type": "json_keys", "keys": ["name", "age"]}, '{"name": "Al", "age": 3}', '{"name": "Al"}'),
    ({"type": "no_commas"}, "No commas here.", "Well, yes."),
    ({"type": "starts_with", "text": "Flowers"}, "flowers bloom.", "The flowers bloom."),
    ({"type": "ends_with", "text": "Goodbye."}, "Wind blows. Goodbye.  ", "Goodbye. Wind blows."),
    ({"type": "title"}, "<<Night Sky>>\nStars shine.", "Night Sky\nStars shine."),
    ({"type": "quotation"}, '"A river flows."', 'A river "flows".'),
    ({"type": "paragraphs", "n": 2}, "First part.\n\nSecond part.", "Only one part."),
    ({"type": "paragraphs", "n": 2, "separator": "***"}, "One.\n***\nTwo.", "One.\n\nTwo."),
    (
        {"type": "nth_paragraph_first_word", "n": 2, "i": 2, "word": "then"},
        "First.\n\nThen second.",
        "First.\n\nNow second.",
    ),
    ({"type": "min_highlights", "n": 2}, "*one* and *two*", "*one* only"),
    ({"type": "sections", "n": 2, "marker": "Section"}, "Section 1\nGo.\nSection 2\nStay.", "Section 1\nGo."),
    ({"type": "min_placeholders", "n": 2}, "Dear [name], see you [date].", "Dear [name], hello."),
    ({"type": "postscript", "marker": "P.S."}, "Hello.\nP.S. Bring cake.", "Hello. Bring cake."),
    ({"type": "capital_words", "n": 2}, "GOAL after GOAL", "Goal after GOAL"),
    ({"type": "repeat_prompt", "text": "Say hi."}, "Say hi. Hi!", "Hi! Say hi."),
    ({"type": "two_responses"}, "Bubbles\n******\nFinn", "Bubbles and Finn"),
    ({"type": "one_of", "options": ["My answer is yes.", "My answer is no."]}, "My answer is no.", "Yes."),
]


def test_every_rule_has_cases():
    assert {case[0]["type"] for case in RULE_CASES} == set(RULES)


@pytest.mark.parametrize(("rule", "good", "bad"), RULE_CASES, ids=[c[0]["type"] for c in RULE_CASES])
def test_rule_pass_and_fail(rule, good, bad):
    validate_rule(rule)
    assert check_rules([rule], good) == {f"0:{rule['type']}": True}
    assert check_rules([rule], bad) == {f"0:{rule['type']}": False}


def test_numbered_lines_and_bold_are_not_bullets():
    assert not check_rules([{"type": "exact_bullets", "n": 2}], "1. apple\n2. pear")["0:exact_bullets"]
    assert not check_rules([{"type": "min_bullets", "n": 1}], "**Bold** heading")["0:min_bullets"]


def test_combined_rules_all_must_hold():
    rules = [{"type": "lowercase"}, {"type": "max_words", "n": 3}]
    assert check_rules(rules, "so very quiet") == {"0:lowercase": True, "1:max_words": True}
    assert check_rules(rules, "so very very quiet") == {"0:lowercase": True, "1:max_words": False}


@pytest.mark.parametrize(
    "rule",
    [{"type": "shout"}, {"type": "max_words"}, {"type": "max_words", "n": 3, "m": 1}, {"n": 2}, "lowercase"],
)
def test_validate_rule_rejects_bad_rules(rule):
    with pytest.raises(ValueError):
        validate_rule(rule)


def test_counters():
    assert count_words("It's a dog-friendly place, isn't it?") == 7
    assert count_sentences("One. Two! Three? four") == 4
    assert count_sentences("   ") == 0


def test_mean_stderr_by_hand():
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert se == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4))
    assert mean_stderr([1.0]) == (1.0, 0.0)


def test_perplexity_stderr_by_hand():
    # Two items: 10 nats over 5 tokens and 6 nats over 5 tokens -> mean NLL 1.6 per token.
    ppl, se = perplexity_stderr([10.0, 6.0], [5, 5])
    assert ppl == pytest.approx(math.exp(1.6))
    resid = (10 - 1.6 * 5) ** 2 + (6 - 1.6 * 5) ** 2
    assert se == pytest.approx(math.exp(1.6) * math.sqrt(resid / 2) / 5)
