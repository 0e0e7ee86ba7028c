"""Statistics for honest forgetting figures: paired changes with intervals, floors, item counts and a capped mean.

Every function works on plain lists of per-item scores (one score per item, 0/1 for accuracy-like scorers, any
float for continuous ones) and is deterministic: the only random step, the bootstrap, takes a ``seed``.

* ``paired_change``: the change ``after - before`` over the same items, with a paired confidence interval and a
  p-value (mid-p McNemar test and Newcombe's interval for 0/1 items, a paired bootstrap otherwise).
* ``stderr``: standard error of a mean.
* ``at_floor``: whether a base score is too close to the suite's floor (chance, or 0) for a ratio to mean anything.
* ``min_items`` / ``too_few_items``: how many items a suite needs to detect a change of a given size.
* ``capped_retention``: the mean of per-suite retention ratios, each capped at 1.0, for the Pareto plot.

Scores are fractions: a change of ``-0.15`` is 15 points lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

FLOOR_MARGIN = 0.05  # how far above the floor the lower end of a base score's interval must lie (at_floor)
MIN_BOOTSTRAP = 30  # continuous suites with fewer items use Student's paired t instead of the bootstrap
_BOOT_CHUNK = 1_000_000  # bootstrap draws materialised at once (memory bound for large suites)


@dataclass(frozen=True)
class Change:
    """The paired change of a suite's score between two models on the same items.

    Attributes:
        delta: ``mean(after) - mean(before)``, a fraction (``-0.15`` = 15 points lost).
        ci_low: lower end of the confidence interval for ``delta``.
        ci_high: upper end of the confidence interval for ``delta``.
        p_value: two-sided p-value for "no change" (mid-p McNemar for 0/1 items, Student's t for small continuous
            suites, approximate bootstrap otherwise).
        significant: for 0/1 items ``p_value < 1 - confidence``; for continuous items the interval excludes 0.
        n: number of paired items.
        stderr_before: standard error of the mean of ``before``.
        stderr_after: standard error of the mean of ``after``.
        method: ``"mcnemar-midp+newcombe"``, ``"paired-t"`` or ``"paired-bootstrap"``.
    """

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    n: int
    stderr_before: float
    stderr_after: float
    method: str


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _finite(name: str, scores: Sequence[float]) -> list[float]:
    values = [float(s) for s in scores]
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"{name}[{bad}] is {values[bad]}; scores must be finite numbers")
    return values


def stderr(scores: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (``n - 1`` denominator) over ``sqrt(n)``.

    Args:
        scores: per-item scores.

    Returns:
        The standard error; 0.0 when there are fewer than two scores.
    """
    values = _finite("scores", scores)
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Args:
        successes: number of successes (a float is accepted for a mean score times ``n``).
        n: number of trials, at least 1.
        confidence: confidence level.

    Returns:
        ``(low, high)``, inside ``[0, 1]``.
    """
    if n < 1:
        raise ValueError(f"a Wilson interval needs n >= 1, got {n}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test: a binomial test of the discordant pairs against a fair coin.

    ``p = min(1, 2 * P(X <= min(lost, gained)))`` with ``X ~ Binomial(lost + gained, 1/2)``; 1.0 when there are no
    discordant pairs (``lost``: right before, wrong after; ``gained``: the reverse).
    """
    return _mcnemar(lost, gained, observed_weight=1.0)


def mcnemar_midp(lost: int, gained: int) -> float:
    """Mid-p McNemar test: the exact test's p-value less the probability of the observed split.

    ``p = 2 * (P(X <= k) - P(X = k) / 2)`` with ``k = min(lost, gained)`` and ``X ~ Binomial(lost + gained, 1/2)``.
    The exact test is conservative (its real level sits well under the nominal one for the small discordant counts
    of a suite); the mid-p version keeps close to the nominal level and agrees with Newcombe's interval far more
    often (Fagerland, Lydersen and Laake, BMC Med. Res. Methodol. 13:91, 2013, recommend it). 1.0 when there are no
    discordant pairs.
    """
    return _mcnemar(lost, gained, observed_weight=0.5)


def _mcnemar(lost: int, gained: int, observed_weight: float) -> float:
    m = lost + gained
    if m == 0:
        return 1.0
    k = min(lost, gained)
    below = sum(math.comb(m, i) for i in range(k)) / 2**m
    return min(1.0, 2 * (below + observed_weight * math.comb(m, k) / 2**m))


def _newcombe_paired(both: int, lost: int, gained: int, neither: int, confidence: float) -> tuple[float, float]:
    """Newcombe's square-and-add interval for ``after - before`` on a paired 2x2 table (Newcombe 1998, method 10).

    The Wilson intervals of the two proportions are combined with the estimated correlation ``phi`` of the two
    proportions, with the numerator corrected as in Newcombe (1998) and Fagerland, Lydersen & Laake (2017):
    ``A = both * neither - lost * gained``; ``phi = (A - n/2) / sqrt(...)`` when ``A > n/2``, 0 when
    ``0 <= A <= n/2``, ``A / sqrt(...)`` when ``A < 0``, and 0 when a margin is empty.
    """
    n = both + lost + gained + neither
    n_before, n_after = both + lost, both + gained  # items right before / after
    p_b, p_a = n_before / n, n_after / n
    l_b, u_b = wilson_interval(n_before, n, confidence)
    l_a, u_a = wilson_interval(n_after, n, confidence)
    margins = (n_before, n - n_before, n_after, n - n_after)
    phi = 0.0
    if all(margins):
        a = both * neither - lost * gained
        num = a - n / 2 if a > n / 2 else (a if a < 0 else 0.0)
        phi = num / math.sqrt(math.prod(margins))
    delta = p_a - p_b
    low = delta - math.sqrt(max((p_a - l_a) ** 2 + (u_b - p_b) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b), 0.0))
    high = delta + math.sqrt(max((u_a - p_a) ** 2 + (p_b - l_b) ** 2 - 2 * phi * (u_a - p_a) * (p_b - l_b), 0.0))
    return max(-1.0, low), min(1.0, high)


def _bootstrap_means(diffs: list[float], n_boot: int, seed: int) -> list[float]:
    """Means of ``n_boot`` resamples (with replacement, same size) of the per-item differences."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK // n)
    means = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        means.append(d[idx].mean(axis=1))
    return np.concatenate(means).tolist()


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default ``linear`` method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_change(
    before: Sequence[float],
    after: Sequence[float],
    binary: bool | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    n_boot: int = 2000,
) -> Change:
    """The change ``after - before`` of a suite's mean score over the same items, with a paired interval.

    Items are paired by position: ``before[i]`` and ``after[i]`` must be the same item (the caller aligns items by
    id). Pairing matters: two models' scores on the same items are correlated, so the paired interval is much
    narrower than one that treats the two lists as independent samples.

    * 0/1 items (``binary``): significance from the mid-p McNemar test (``mcnemar_midp``), a two-sided binomial
      test of the discordant pairs (``lost``: right before, wrong after; ``gained``: the reverse) against 1/2; the
      interval is Newcombe's square-and-add interval for paired proportions (Newcombe 1998, Stat. Med. 17:2635,
      method 10: Wilson intervals of both proportions combined with their estimated correlation). ``significant``
      is ``p_value < 1 - confidence``. The exact test (``mcnemar_exact``) was used first; on the demo it called a
      world-knowledge loss of 11 items against 3 gained (of 48; interval -0.305 to -0.015; exact p 0.057) not
      significant, so the table and the interval disagreed; the mid-p test keeps near the nominal level and agrees
      with the interval except at the margin.
    * Continuous items, fewer than ``MIN_BOOTSTRAP``: Student's paired t-interval and t-test on the differences.
    * Continuous items, ``MIN_BOOTSTRAP`` or more: a paired bootstrap of the mean difference (``n_boot``
      resamples of the items, the same resampled items for both models, seeded), with the percentile interval;
      ``significant`` means the interval excludes 0, and ``p_value`` is the approximate bootstrap p-value
      ``min(1, 2 * (min(#means <= 0, #means >= 0) + 1) / (n_boot + 1))``.

    Args:
        before: per-item scores of the reference model (e.g. the base).
        after: per-item scores of the other model (e.g. a fine-tuned arm), same items in the same order.
        binary: treat scores as 0/1; ``None`` detects it (every value is 0 or 1).
        confidence: confidence level of the interval (and ``1 - confidence`` is the test's level).
        seed: bootstrap seed (continuous items only).
        n_boot: number of bootstrap resamples (continuous items only).

    Returns:
        The ``Change``.

    Raises:
        ValueError: no items, lists of different lengths, non-finite scores, ``binary=True`` with a score that is not
            0 or 1, or a confidence outside (0, 1).
    """
    if len(before) != len(after):
        raise ValueError(
            f"before and after must score the same items: got {len(before)} and {len(after)} scores "
            "(align the items by id first)"
        )
    if not before:
        raise ValueError("no items: a change needs at least one paired score")
    b, a = _finite("before", before), _finite("after", after)
    alpha = 1 - confidence
    _z(confidence)  # validates confidence
    n = len(b)
    is01 = all(v in (0.0, 1.0) for v in b + a)
    if binary is None:
        binary = is01
    elif binary and not is01:
        raise ValueError("binary=True but some scores are neither 0 nor 1")
    delta = sum(a) / n - sum(b) / n
    se_b, se_a = stderr(b), stderr(a)
    if binary:
        lost = sum(1 for x, y in zip(b, a, strict=True) if x == 1 and y == 0)
        gained = sum(1 for x, y in zip(b, a, strict=True) if x == 0 and y == 1)
        both = sum(1 for x, y in zip(b, a, strict=True) if x == 1 and y == 1)
        low, high = _newcombe_paired(both, lost, gained, n - both - lost - gained, confidence)
        p = mcnemar_midp(lost, gained)
        return Change(delta, low, high, p, p < alpha, n, se_b, se_a, "mcnemar-midp+newcombe")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    diffs = [y - x for x, y in zip(b, a, strict=True)]
    if n < MIN_BOOTSTRAP:
        # A bootstrap of a handful of items cannot see its own noise (4 items that all moved the same way give an
        # interval that excludes 0 whatever their spread); Student's paired t-interval is honest at small n.
        if n < 2:
            return Change(delta, -math.inf, math.inf, 1.0, False, n, se_b, se_a, "paired-t")
        se = stderr(diffs)
        if se == 0:
            p = 1.0 if delta == 0 else 0.0
            return Change(delta, delta, delta, p, delta != 0, n, se_b, se_a, "paired-t")
        half = t_quantile(1 - alpha / 2, n - 1) * se
        p = 2 * (1 - t_cdf(abs(delta) / se, n - 1))
        return Change(delta, delta - half, delta + half, p, p < alpha, n, se_b, se_a, "paired-t")
    means = sorted(_bootstrap_means(diffs, n_boot, seed))
    low, high = _quantile(means, alpha / 2), _quantile(means, 1 - alpha / 2)
    far = min(sum(1 for m in means if m <= 0), sum(1 for m in means if m >= 0))
    p = min(1.0, 2 * (far + 1) / (n_boot + 1))
    return Change(delta, low, high, p, low > 0 or high < 0, n, se_b, se_a, "paired-bootstrap")


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom (Simpson's rule on the density)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    # substitute t = u / (1 - u) on [0, x] so long tails stay accurate; 2000 Simpson panels
    upper = x / (1 + x)
    steps = 2000
    h = upper / steps
    total = 0.0
    for i in range(steps + 1):
        u = i * h
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * density(u / (1 - u)) / (1 - u) ** 2
    return 0.5 + total * h / 3


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (``q > 0.5``) of Student's t with ``df`` degrees of freedom, by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def at_floor(base_score: float, n: int, floor: float, confidence: float = 0.95, margin: float = FLOOR_MARGIN) -> bool:
    """Whether a base score is not clearly above the suite's floor, so a retention ratio on it means nothing.

    Rule: the lower end of the Wilson interval of the base score (treated as a proportion of ``n`` items) is at
    most ``floor + margin``. The floor is what a model gets without knowing anything: chance for multiple choice
    (0.25 for four options), 0 for generation. Examples at 95%: 2/30 with floor 0 has a Wilson interval of
    about [0.018, 0.213], at the floor (a ratio such as 6/30 / 2/30 = 3.0 would be noise); 36/48 = 0.75 with
    floor 0.25 has about [0.61, 0.85], clearly above.

    Args:
        base_score: the base model's mean score, a fraction in [0, 1].
        n: number of items the score is averaged over.
        floor: the suite's floor score.
        confidence: confidence level of the Wilson interval.
        margin: how far above the floor the interval's lower end must lie (default ``FLOOR_MARGIN`` = 0.05).

    Returns:
        True when the suite is at the floor (and should be left out of ratios); always True for ``n = 0``.
    """
    if not 0 <= base_score <= 1:
        raise ValueError(f"base_score must be a fraction in [0, 1], got {base_score}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return True
    low, _ = wilson_interval(base_score * n, n, confidence)
    return low <= floor + margin


def min_items(effect: float = 0.10, confidence: float = 0.95, power: float = 0.8, p: float = 0.5) -> int:
    """Items a suite needs to detect a change of ``effect`` (a fraction) between two models.

    Normal approximation of a two-sided two-proportion test with the same variance ``p(1-p)`` in both models:
    ``n = ceil((z_{1-alpha/2} + z_{power})^2 * 2 p (1-p) / effect^2)`` with ``alpha = 1 - confidence``. With
    ``p = 0.5`` (the worst case) this is 393 items for 10 points at 95% and 80% power
    (``(1.95996 + 0.84162)^2 * 0.5 / 0.01 = 392.4``). It treats the two scorings as independent; on the same
    items they are positively correlated and a paired test needs fewer items (by a factor ``1 - rho``), so this is a
    conservative count.

    Args:
        effect: the change to detect, a fraction (0.10 = 10 points).
        confidence: confidence level of the test (``alpha = 1 - confidence``, two-sided).
        power: probability of detecting a true change of ``effect``.
        p: the score level that sets the variance; 0.5 is the worst case.

    Returns:
        The number of items, rounded up.
    """
    if not 0 < effect <= 1:
        raise ValueError(f"effect must be in (0, 1], got {effect}")
    if not 0 < power < 1:
        raise ValueError(f"power must be between 0 and 1 (exclusive), got {power}")
    if not 0 < p < 1:
        raise ValueError(f"p must be between 0 and 1 (exclusive), got {p}")
    z = _z(confidence) + NormalDist().inv_cdf(power)
    return math.ceil(z * z * 2 * p * (1 - p) / (effect * effect) - 1e-9)


def too_few_items(n: int, effect: float = 0.10, confidence: float = 0.95) -> bool:
    """Whether ``n`` items are fewer than ``min_items(effect, confidence)`` (80% power, worst-case variance).

    Args:
        n: the suite's number of items.
        effect: the change it should be able to detect, a fraction.
        confidence: confidence level of the test.

    Returns:
        True when the suite is too small to detect a change of ``effect``.
    """
    return n < min_items(effect, confidence)


def capped_retention(ratios: dict[str, float]) -> float | None:
    """The aggregate retention the Pareto plot uses: the mean of per-suite retention ratios, each capped at 1.0.

    Capping keeps a suite that improved (ratio > 1) from hiding another suite's loss in the mean: 0.7 and 1.3
    average to 1.0 uncapped but to 0.85 capped. Suites at the floor (``at_floor``) have meaningless ratios; the
    caller leaves them out before calling this.

    Args:
        ratios: ``{suite name: retained ratio}`` (1.0 = unchanged, oriented so lower is worse).

    Returns:
        The capped mean, or None when ``ratios`` is empty.

    Raises:
        ValueError: a ratio that is not a finite number (a zero base score; leave such suites out).
    """
    if not ratios:
        return None
    for name, r in ratios.items():
        if r is None or not math.isfinite(r):
            raise ValueError(f"suite {name!r}: retention ratio {r} is not a finite number; leave it out")
    return sum(min(r, 1.0) for r in ratios.values()) / len(ratios)
