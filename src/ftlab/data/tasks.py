"""Small generated tasks with verifiable answers, for GRPO smoke runs and forgetting experiments on small models.

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
