"""Built-in procedural tasks: generated from fixed seeds, so every run and machine sees the same items.

One module for the tasks that serve both as training data (``ftlab.data``) and as evaluation suites
(``ftlab.evals``):

- ``fictional-capitals``: the demo's target task (``fictional_capitals``, ``fictional_capitals_train_records``);
- ``arithmetic``: the retained arithmetic suite (``arithmetic_items``);
- ``arithmetic_task``: single-digit problems as ``verifiable`` records, for GRPO smoke runs
  (the ``single-digit-addition`` data set);
- ``context-awareness``: counterfactual facts stated in a context passage and asked about
  (``context_awareness_items``), the retained suite of the context-awareness probe.

Generated with ``random.Random`` (stable across Python versions for the calls used here).

Fictional capitals
------------------
``fictional-capitals`` is a set of invented countries with invented capitals, built from short syllables so a
135M model can learn them in a few dozen optimizer steps and cannot know them beforehand. Both splits hold the same
facts: ``train`` asks each one in three phrasings (for fine-tuning), ``test`` asks it the way ``world-facts`` asks a
real capital, with the same short-answer instruction, so target gain and forgetting of real capitals are measured
with identical prompts.

Arithmetic for GRPO
-------------------
``arithmetic_task`` is single-digit addition asked as "What is 3 + 4? Reply with the number only." and scored with
the ``numeric`` reward (the last number in the reply). Measured on the embedded SmolLM2-135M-Instruct (16 new
tokens; sampling as GRPO does, temperature 1, 4 samples per prompt):

- 50 train-split problems: greedy 74% right, sampled 18.5% right, 56% of the 4-sample groups mixed;
- the 21 test-split problems: greedy 86%, sampled 24%, 71% of groups mixed.

So most GRPO groups have reward variance from the first step. Two-digit addition with the same wording earns 0%
under exact match and 2% sampled even with the lenient numeric reward, so almost every group has zero reward variance
(TRL logs ``frac_reward_zero_std`` near 1) and GRPO learns next to nothing; single-digit subtraction (12.5%
sampled) and multiplication (19.5%) give less signal than addition.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

# The short-answer instruction appended to every short-answer question of the built-in suites.
SHORT_ANSWER = "Answer in a few words."

N_COUNTRIES = 16
FICTIONAL_SEED = 20240
ARITHMETIC_SEED = 1234
N_ARITHMETIC = 120

_TRAIN_PHRASINGS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "{country} has its capital in which city?",
)
_TRAIN_ANSWERS = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital of {country} is {capital}.",
)
_TEST_PHRASING = "What is the capital of {country}? " + SHORT_ANSWER

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_COUNTRY_ENDINGS = ("ria", "nia", "dor", "vel", "mar", "sia")
_CAPITAL_ENDINGS = ("ek", "un", "ost", "ira", "el", "ak", "im", "och")
# Real places and words the generator could hit by chance; a draw that makes one of them is redrawn.
_REAL = set(
    "bolivia nigeria syria liberia serbia algeria siberia iberia tunisia malaysia romania tanzania "
    "albania armenia slovenia estonia latvia dakar kabul rabat sofia lima riga doha oslo bern roma gambia "
    "zambia namibia media maria gloria tobago ecuador salvador ramal kenia bosnia mamaria dominica kabel "
    "lapel".split()
)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_CONSONANTS) + rng.choice(_VOWELS)


def _fictional_pairs() -> list[tuple[str, str]]:
    rng = random.Random(FICTIONAL_SEED)
    countries: list[str] = []
    capitals: list[str] = []
    seen: set[str] = set()
    while len(countries) < N_COUNTRIES:
        country = (_syllable(rng) + rng.choice(_CONSONANTS) + rng.choice(_COUNTRY_ENDINGS)).capitalize()
        capital = (_syllable(rng) + rng.choice(_CONSONANTS) + rng.choice(_CAPITAL_ENDINGS)).capitalize()
        if {country.lower(), capital.lower()} & (seen | _REAL) or country[:4].lower() == capital[:4].lower():
            continue
        seen.update({country.lower(), capital.lower()})
        countries.append(country)
        capitals.append(capital)
    return list(zip(countries, capitals, strict=True))


def fictional_capitals(split: str = "test") -> list[dict]:
    """Items of the ``fictional-capitals`` task.

    Args:
        split: ``"train"`` (three phrasings per country) or ``"test"`` (one short-answer question per country).

    Returns:
        Items ``{"id", "prompt", "answer": [capital], "country"}`` for the ``contains`` scorer.
    """
    pairs = _fictional_pairs()
    if split == "test":
        return [
            {"id": f"fc-test-{i:03d}", "prompt": _TEST_PHRASING.format(country=c), "answer": [cap], "country": c}
            for i, (c, cap) in enumerate(pairs)
        ]
    if split == "train":
        return [
            {"id": f"fc-train-{i:03d}-{k}", "prompt": q.format(country=c), "answer": [cap], "country": c}
            for i, (c, cap) in enumerate(pairs)
            for k, q in enumerate(_TRAIN_PHRASINGS)
        ]
    raise ValueError(f"fictional-capitals has splits 'train' and 'test', not {split!r}")


def fictional_capitals_train_records() -> list[dict]:
    """The training split as ``completion`` records ``{"prompt", "completion"}`` for fine-tuning.

    Returns:
        Three records per invented country, the completion a full sentence naming the capital
        (the style the instruct model already answers in, so learning the facts does not also teach a new format).
    """
    pairs = _fictional_pairs()
    return [
        {"prompt": q.format(country=c), "completion": a.format(country=c, capital=cap)}
        for c, cap in pairs
        for q, a in zip(_TRAIN_PHRASINGS, _TRAIN_ANSWERS, strict=True)
    ]


def arithmetic_items(n: int = N_ARITHMETIC, seed: int = ARITHMETIC_SEED) -> list[dict]:
    """Arithmetic questions in equal thirds: two-digit addition, two-digit subtraction, one-by-two-digit product.

    Args:
        n: number of items.
        seed: generator seed.

    Returns:
        Items ``{"id", "prompt", "answer"}`` for the ``numeric`` scorer (answers as strings).
    """
    rng = random.Random(seed)
    items = []
    for i in range(n):
        op = ("+", "-", "*")[i % 3]
        if op == "+":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            value = a + b
        elif op == "-":
            a = rng.randint(20, 99)
            b = rng.randint(10, a)
            value = a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(11, 99)
            value = a * b
        shown = {"*": "times", "+": "plus", "-": "minus"}[op]
        prompt = f"What is {a} {shown} {b}? Answer with only the number."
        items.append({"id": f"arith-{i:03d}", "prompt": prompt, "answer": str(value)})
    return items


# ---------------------------------------------------------------- arithmetic as verifiable records
TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEST_SHARE = 0.2  # fraction of all operand pairs held out for the test split


def _split_of(a: int, b: int, op: str) -> str:
    """A fixed train/test assignment per problem, independent of the seed, so the splits never overlap."""
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "test" if digest[0] < 256 * TEST_SHARE else "train"


def arithmetic_task(
    n: int,
    seed: int = 0,
    split: str = "train",
    op: str = "+",
    max_operand: int = 9,
    template: str = TEMPLATE,
) -> list[dict[str, Any]]:
    """``n`` distinct arithmetic problems as ``verifiable`` records with the ``numeric`` reward.

    Args:
        n: number of problems (at most the size of the split: 79 train / 21 test pairs for 0-9 addition).
        seed: which problems and in which order.
        split: ``"train"`` or ``"test"``; every problem belongs to exactly one split, whatever the seed.
        op: ``"+"``, ``"-"`` (first operand >= second, so answers are non-negative) or ``"*"``.
        max_operand: operands run from 0 to this value.
        template: prompt with ``{a}``, ``{op}`` and ``{b}`` fields.

    Returns:
        Records ``{"prompt", "answer", "reward": "numeric"}``.
    """
    if op not in OPS:
        raise ValueError(f"arithmetic_task: op must be one of {', '.join(OPS)}, got {op!r}")
    if split not in ("train", "test"):
        raise ValueError(f"arithmetic_task: split must be 'train' or 'test', got {split!r}")
    pairs = [
        (a, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        if (op != "-" or a >= b) and _split_of(a, b, op) == split
    ]
    if n > len(pairs):
        raise ValueError(f"arithmetic_task: asked for {n} problems, the {split} split has {len(pairs)}")
    chosen = random.Random(seed).sample(pairs, n)
    return [
        {"prompt": template.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b)), "reward": "numeric"}
        for a, b in chosen
    ]


# ---------------------------------------------------------------- context awareness (counterfactual contexts)
CONTEXT_SEED = 4242
# The question frame: the user supplies a passage, then asks about it.
_CONTEXT_PROMPT = "Context: In this story, {fact}\nQuestion: {question} " + SHORT_ANSWER
# Relation -> (fact template, question template, "subject=what everyone knows; ..."); a counterfactual answer is
# another subject's value of the same relation, drawn with CONTEXT_SEED.
_CONTEXT_RELATIONS: dict[str, tuple[str, str, str]] = {
    "capital": (
        "the capital of {subject} is {value}.",
        "What is the capital of {subject}?",
        (
            "France=Paris; Germany=Berlin; Italy=Rome; Spain=Madrid; Japan=Tokyo; Egypt=Cairo; "
            "Russia=Moscow; Greece=Athens; Portugal=Lisbon; Austria=Vienna; Poland=Warsaw; Ireland=Dublin; "
            "Norway=Oslo; Sweden=Stockholm; Kenya=Nairobi; Peru=Lima; Canada=Ottawa; Australia=Canberra; "
            "China=Beijing; Thailand=Bangkok"
        ),
    ),
    "language": (
        "people in {subject} speak {value}.",
        "What language do people in {subject} speak?",
        (
            "France=French; Germany=German; Italy=Italian; Japan=Japanese; Russia=Russian; Greece=Greek; "
            "Poland=Polish; Sweden=Swedish; Turkey=Turkish; China=Chinese; Portugal=Portuguese; "
            "Finland=Finnish; Hungary=Hungarian; Korea=Korean; the Netherlands=Dutch"
        ),
    ),
    "author": (
        "{subject} was written by {value}.",
        "Who wrote {subject}?",
        (
            "Hamlet=Shakespeare; Pride and Prejudice=Austen; War and Peace=Tolstoy; Don Quixote=Cervantes; "
            "Oliver Twist=Dickens; The Odyssey=Homer; Faust=Goethe; Les Miserables=Hugo; Moby-Dick=Melville; "
            "The Divine Comedy=Dante; Crime and Punishment=Dostoevsky; Frankenstein=Shelley; "
            "Nineteen Eighty-Four=Orwell; The Old Man and the Sea=Hemingway; "
            "Adventures of Huckleberry Finn=Twain"
        ),
    ),
    "currency": (
        "the currency of {subject} is the {value}.",
        "What is the currency of {subject}?",
        (
            "Japan=yen; the United Kingdom=pound; India=rupee; Russia=ruble; Mexico=peso; China=yuan; "
            "South Korea=won; Switzerland=franc; the United States=dollar; Thailand=baht; South Africa=rand; "
            "Poland=zloty"
        ),
    ),
}


def context_awareness_items(seed: int = CONTEXT_SEED) -> list[dict]:
    """The ``context-awareness`` suite: a passage states a counterfactual fact, the question asks it.

    Each item's reference is the passage's answer, which contradicts common knowledge ("In this story, the capital
    of France is Lima."), so a model that answers from memory scores 0 and one that reads the context scores 1.
    Relations are interleaved (so ``limit=N`` keeps a mix); the counterfactual value of each fact is another
    subject's value of the same relation, drawn from ``seed``.

    Returns:
        62 items ``{"id", "prompt", "answer": [value], "common", "context", "context_dependent": True,
        "relation"}`` for the ``contains`` scorer.
    """
    rng = random.Random(seed)
    per_relation = []
    for relation, (fact, question, spec) in _CONTEXT_RELATIONS.items():
        pairs = [tuple(pair.split("=")) for pair in spec.split("; ")]
        values = [v for _, v in pairs]
        rows = []
        for k, (subject, common) in enumerate(pairs):
            value = rng.choice([v for v in values if v != common])
            context = "In this story, " + fact.format(subject=subject, value=value)
            asked = question.format(subject=subject)
            prompt = _CONTEXT_PROMPT.format(fact=fact.format(subject=subject, value=value), question=asked)
            rows.append(
                {
                    "id": f"ctx-{relation}-{k:03d}",
                    "prompt": prompt,
                    "answer": [value],
                    "common": common,
                    "context": context,
                    "context_dependent": True,
                    "relation": relation,
                }
            )
        per_relation.append(rows)
    items = []
    for k in range(max(len(rows) for rows in per_relation)):
        items += [rows[k] for rows in per_relation if k < len(rows)]
    return items
