"""Rule-based rewards for GRPO: plain Python functions ``(completion, answer) -> float``, looked up by name.

A ``verifiable`` record names its reward in the ``reward`` field (default: the GRPO settings' ``reward``). Add your
own with ``register_reward("my_reward", fn)``; ``fn(completion: str, answer: str | list[str]) -> float`` where a
list of answers means "any of these is right".

Built-in rewards (1.0 right, 0.0 wrong):

- ``exact``: the answer text equals a reference after normalisation (case, surrounding spaces, quotes, final period).
- ``numeric``: the answer's number equals a reference number (commas dropped, relative tolerance 1e-6). In free text
  the *last* number counts (the GSM8K convention; "3 + 4 = 7" and "The answer is 7." both give 7).
- ``choice``: multiple choice; the chosen option letter (A-J) equals the reference letter.
- ``format``: an ``<answer>...</answer>`` tag with non-empty content is present (the R1-V / CLS-RL format reward).

The answer is read from the last ``<answer>...</answer>`` tag when there is one, else from the last ``\\boxed{...}``
(the EasyR1 math reward's convention), else from the whole completion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

RewardFn = Callable[[str, "str | list[str]"], float]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\b\)?", re.IGNORECASE),  # "The answer is (B)", "Answer: B"
    re.compile(r"^\s*\(?([A-J])\s*(?:[).:]|$)"),  # "B", "(B)", "B) Paris", "B. Paris"
    re.compile(r"\(([A-J])\)"),  # "... so (B)"
    re.compile(r"\b([A-J])\b"),  # a standalone capital letter anywhere
)


def extract_answer(completion: str) -> str:
    """The answer region of a completion: last ``<answer>`` tag, else last ``\\boxed{}``, else the whole text."""
    tags = _TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
    return completion.strip()


def _answers(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


def _normalise(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    text = text.strip("\"'`")
    return text.rstrip(".").strip()


def parse_number(text: str, last: bool = True) -> float | None:
    """The last (or first) number in ``text``, with thousands commas dropped; None when there is none."""
    found = _NUMBER.findall(_DIGIT_COMMA.sub("", text))
    if not found:
        return None
    try:
        return float(found[-1] if last else found[0])
    except ValueError:
        return None


def exact_reward(completion: str, answer: str | list[str]) -> float:
    """1.0 when the extracted answer equals a reference after normalisation."""
    got = _normalise(extract_answer(completion))
    return float(any(got == _normalise(a) for a in _answers(answer)))


def numeric_reward(completion: str, answer: str | list[str]) -> float:
    """1.0 when the last number of the extracted answer equals a reference number."""
    got = parse_number(extract_answer(completion))
    if got is None:
        return 0.0
    for ref_text in _answers(answer):
        ref = parse_number(ref_text)
        if ref is not None and math.isclose(got, ref, rel_tol=1e-6, abs_tol=1e-9):
            return 1.0
    return 0.0


def choice_letter(text: str) -> str | None:
    """The option letter a completion picks (``"B"``), or None."""
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return None


def choice_reward(completion: str, answer: str | list[str]) -> float:
    """1.0 when the chosen option letter equals the reference letter."""
    got = choice_letter(extract_answer(completion))
    return float(got is not None and any(got == a.strip().strip("()").upper() for a in _answers(answer)))


def format_reward(completion: str, answer: str | list[str]) -> float:
    """1.0 when the completion holds an ``<answer>...</answer>`` tag with non-empty content (``answer`` unused)."""
    return float(any(t.strip() for t in _TAG.findall(completion)))


REWARDS: dict[str, RewardFn] = {
    "exact": exact_reward,
    "numeric": numeric_reward,
    "choice": choice_reward,
    "format": format_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn(completion, answer) -> float`` available to records as ``"reward": name``.

    Args:
        name: the name records use.
        fn: the reward function.
    """
    if not callable(fn):
        raise TypeError(f"register_reward: {name!r} needs a callable, got {type(fn).__name__}")
    REWARDS[name] = fn


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))} or register_reward() it")
    return REWARDS[name]


def score(completion: str, answer: str | list[str], reward: str = "exact", format_weight: float = 0.0) -> float:
    """The reward of one completion: ``(1 - w) * reward + w * format`` (EasyR1's overall reward, ``w = 0.1`` there).

    Args:
        completion: the generated text.
        answer: the reference answer(s).
        reward: name of the accuracy reward.
        format_weight: weight ``w`` of the format reward (0: accuracy only).

    Returns:
        The reward.
    """
    acc = get_reward(reward)(completion, answer)
    if format_weight == 0.0:
        return float(acc)
    return (1.0 - format_weight) * acc + format_weight * format_reward(completion, answer)
