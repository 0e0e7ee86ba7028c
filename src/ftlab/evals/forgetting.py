"""Forgetting figures: target gain, retained ratio, and continual-learning metrics on an accuracy matrix.

Conventions (docs/methods.md, "Continual metrics"): the accuracy matrix ``R`` has ``T + 1`` rows and ``T`` columns;
``R[t][i]`` is
the score on task ``i`` after training stage ``t`` (1-based in the formulas below), and row 0 is the model before
any training. Tasks are averaged with equal weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def target_gain(before: float, after: float) -> float:
    """Improvement on the target task: ``gain = after - before``.

    Args:
        before: target score before training.
        after: target score after training.

    Returns:
        The gain (positive means the task was learned).
    """
    return after - before


def retained_ratio(before: float, after: float, higher_is_better: bool) -> float:
    """Share of a retained suite's score kept after training, oriented so 1.0 = unchanged and < 1.0 = worse.

    ``retained = after / before`` for higher-is-better metrics (accuracy) and ``retained = before / after`` for
    lower-is-better ones (perplexity). A zero denominator gives ``nan`` (or 1.0 when both are zero).

    Args:
        before: score before training.
        after: score after training.
        higher_is_better: the metric's direction.

    Returns:
        The retained ratio.
    """
    num, den = (after, before) if higher_is_better else (before, after)
    if den == 0:
        return 1.0 if num == 0 else math.nan
    return num / den


def _check_matrix(R: Sequence[Sequence[float]]) -> int:
    T = len(R) - 1
    if T < 1 or any(len(row) != T for row in R):
        shape = [len(row) for row in R]
        raise ValueError(f"R must be (T + 1) x T with row 0 = before training, got row lengths {shape}")
    return T


def continual_metrics(R: Sequence[Sequence[float]]) -> dict[str, float]:
    """Average accuracy, backward transfer, forward transfer and forgetting of a sequence of stages.

    With ``T`` tasks and ``R[t][i]`` the score on task ``i`` after stage ``t`` (row 0 = before training), 1-based:

    * ``acc = (1/T) * sum_{i=1..T} R[T][i]`` (GEM average accuracy, mean of the last row);
    * ``bwt = (1/(T-1)) * sum_{i=1..T-1} (R[T][i] - R[i][i])`` (GEM backward transfer, **denominator T - 1**, the
      last task excluded; negative means forgetting);
    * ``fwt = (1/(T-1)) * sum_{i=2..T} (R[i-1][i] - R[0][i])`` (GEM forward transfer, with the base model's score
      ``R[0][i]`` as the reference);
    * ``forgetting = (1/(T-1)) * sum_{j=1..T-1} (max_{l in j..T-1} R[l][j] - R[T][j])`` (Chaudhry et al.; positive
      means forgetting; the maximum is over rows after task ``j`` was learned, not just the diagonal).

    With ``T = 1`` the averages over ``T - 1`` tasks are empty and ``bwt``, ``fwt`` and ``forgetting`` are ``nan``.
    Worked example: ``T = 2``, ``R[1][1] = 0.9``, ``R[2][1] = 0.6``, ``R[2][2] = 0.8`` gives
    ``acc = 0.7``, ``bwt = -0.3``, ``forgetting = 0.3``.

    Args:
        R: the ``(T + 1) x T`` accuracy matrix.

    Returns:
        ``{"acc", "bwt", "fwt", "forgetting"}``.
    """
    T = _check_matrix(R)
    acc = sum(R[T][i] for i in range(T)) / T
    if T == 1:
        return {"acc": acc, "bwt": math.nan, "fwt": math.nan, "forgetting": math.nan}
    # Python indices: task i (1-based) is column i - 1; stage t is row t.
    bwt = sum(R[T][i - 1] - R[i][i - 1] for i in range(1, T)) / (T - 1)
    fwt = sum(R[i - 1][i - 1] - R[0][i - 1] for i in range(2, T + 1)) / (T - 1)
    forgetting = sum(max(R[s][j - 1] for s in range(j, T)) - R[T][j - 1] for j in range(1, T)) / (T - 1)
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting}


def forgetting_summary(before: dict, after: dict, target: str | None = None) -> dict:
    """Target gain and retained ratio per suite from two ``evaluate_many`` results.

    Args:
        before: ``{suite name: SuiteResult}`` for the model before training.
        after: the same suites after training.
        target: the target suite's name (reported as a gain, not a retained ratio), if any.

    Returns:
        ``{"target_gain": float | None, "retained": {suite name: ratio}}`` over suites present in both.
    """
    gain = target_gain(before[target].score, after[target].score) if target in before and target in after else None
    retained = {
        name: retained_ratio(before[name].score, after[name].score, before[name].higher_is_better)
        for name in before
        if name in after and name != target
    }
    return {"target_gain": gain, "retained": retained}
