"""Statistics for forgetting figures: paired changes, floors, item counts and the capped retention mean."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import pytest

from ftlab.evals.stats import (
    Change,
    at_floor,
    capped_retention,
    mcnemar_exact,
    min_items,
    paired_change,
    stderr,
    too_few_items,
    wilson_interval,
)


def paired_table(both: int, lost: int, gained: int, neither: int) -> tuple[list[int], list[int]]:
    """Before/after 0/1 scores with the given paired 2x2 counts (lost: right before, wrong after)."""
    before = [1] * both + [1] * lost + [0] * gained + [0] * neither
    after = [1] * both + [0] * lost + [1] * gained + [0] * neither
    return before, after


def test_mcnemar_exact_p_values():
    # 10 discordant pairs, all one way: p = 2 * 0.5**10.
    before, after = paired_table(both=20, lost=10, gained=0, neither=5)
    change = paired_change(before, after)
    assert change.method == "mcnemar-midp+newcombe"
    assert change.p_value == pytest.approx(2 * 0.5**10 - 0.5**10)  # mid-p: less the observed split's probability
    assert change.significant
    assert change.delta == pytest.approx(-10 / 35)
    # Lost 6, gained 16: 2 * P(Binomial(22, 1/2) <= 6) = 0.052479 (Fagerland et al. 2017, Cavo et al. data).
    assert mcnemar_exact(6, 16) == pytest.approx(2 * sum(math.comb(22, k) for k in range(7)) / 2**22)
    assert mcnemar_exact(6, 16) == pytest.approx(0.052479, abs=1e-6)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_binary_interval_is_newcombe_paired():
    # Cavo et al. (2012) table from Fagerland, Lydersen & Laake, ch. 8: [[59, 6], [16, 80]]; their Newcombe
    # square-and-add interval for p1 - p2 is -0.0621 (-0.1186 to -0.0046), so after - before is its mirror.
    before, after = paired_table(both=59, lost=6, gained=16, neither=80)
    change = paired_change(before, after)
    assert change.delta == pytest.approx(10 / 161)
    assert change.ci_low == pytest.approx(0.0046, abs=5e-5)
    assert change.ci_high == pytest.approx(0.1186, abs=5e-5)
    # The exact McNemar p is 0.052, the mid-p one 0.035 (as Fagerland et al. report): significant, like the interval.
    assert change.p_value == pytest.approx(0.0347, abs=5e-4) and change.significant
    # Paired, not unpaired: an independent two-sample interval would be far wider and span 0.
    assert change.ci_high - change.ci_low < 0.12


def test_continuous_paired_bootstrap_ci_excludes_zero():
    rng = random.Random(1)
    before = [rng.random() for _ in range(200)]
    # A small, consistent drop with little per-item noise: invisible unpaired (scores spread over [0, 1]),
    # clear when paired.
    after = [x - 0.04 + rng.gauss(0, 0.05) for x in before]
    change = paired_change(before, after, seed=3)
    assert change.method == "paired-bootstrap" and change.n == 200
    assert change.delta == pytest.approx(sum(after) / 200 - sum(before) / 200)
    assert change.ci_low < change.delta < change.ci_high < 0
    assert change.significant and change.p_value < 0.05
    # Bootstrap half-width close to the normal one for the paired differences.
    diffs = [y - x for x, y in zip(before, after, strict=True)]
    half = 1.96 * stderr(diffs)
    assert (change.ci_high - change.ci_low) / 2 == pytest.approx(half, rel=0.15)


def test_continuous_paired_bootstrap_ci_includes_zero():
    rng = random.Random(2)
    before = [rng.random() for _ in range(100)]
    after = [x + rng.gauss(0, 0.2) for x in before]
    after = [y - (sum(after) - sum(before)) / 100 for y in after]  # mean difference exactly 0
    change = paired_change(before, after)
    assert change.delta == pytest.approx(0, abs=1e-12)
    assert change.ci_low < 0 < change.ci_high
    assert not change.significant and change.p_value > 0.5


def test_binary_detection_and_forcing():
    assert paired_change([1, 0, 1], [1, 1, 0]).method == "mcnemar-midp+newcombe"
    assert paired_change([1.0, 0.5], [1.0, 0.0]).method == "paired-t"  # continuous, fewer than 30 items
    assert paired_change([1, 0, 1], [1, 1, 0], binary=False).method == "paired-t"
    assert paired_change([1.0, 0.5] * 15, [1.0, 0.0] * 15).method == "paired-bootstrap"
    with pytest.raises(ValueError, match="neither 0 nor 1"):
        paired_change([0.5], [1.0], binary=True)


def test_deterministic_with_a_seed():
    rng = random.Random(4)
    before = [rng.random() for _ in range(50)]
    after = [x + rng.gauss(0, 0.3) for x in before]
    first, again = paired_change(before, after, seed=7), paired_change(before, after, seed=7)
    assert first == again
    other = paired_change(before, after, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert other.delta == first.delta


def test_errors_and_stderr():
    with pytest.raises(ValueError, match="same items.*3 and 2"):
        paired_change([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no items"):
        paired_change([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_change([1.0, math.nan], [1.0, 0.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_change([1], [0], confidence=95)
    assert stderr([]) == 0.0 and stderr([0.7]) == 0.0
    # 4 of 10 right: sample sd = sqrt(0.4 * 0.6 * 10 / 9), stderr = that / sqrt(10).
    assert stderr([1] * 4 + [0] * 6) == pytest.approx(math.sqrt(0.24 * 10 / 9 / 10))
    change = paired_change([1] * 4 + [0] * 6, [1] * 10)
    assert change.stderr_before == pytest.approx(stderr([1] * 4 + [0] * 6)) and change.stderr_after == 0.0
    assert isinstance(change, Change) and change.n == 10


def test_at_floor():
    low, high = wilson_interval(2, 30)
    assert low == pytest.approx(0.0185, abs=1e-4) and high == pytest.approx(0.2132, abs=1e-4)
    assert at_floor(2 / 30, 30, floor=0.0)  # so 6/30 / 2/30 = 3.0 is never shown
    assert not at_floor(36 / 48, 48, floor=0.25)  # Wilson [0.61, 0.85], far above chance
    assert not at_floor(36 / 48, 48, floor=0.0)
    assert at_floor(0.35, 48, floor=0.25)  # 4-way chance is 0.25; 0.35 on 48 items is not clearly above it
    assert not at_floor(0.35, 2000, floor=0.25)  # ... but on 2000 items it is
    assert at_floor(0.0, 0, floor=0.0)


def test_min_items_matches_the_formula():
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    expected = math.ceil(z**2 * 2 * 0.25 / 0.10**2)
    assert expected == 393
    assert min_items(0.10, 0.95) == 393
    assert 300 <= min_items() <= 500
    assert min_items(0.05) > 4 * 390  # a quarter of the effect needs four times the items
    assert min_items(0.10, 0.99) > min_items(0.10, 0.95)
    assert too_few_items(48) and too_few_items(392) and not too_few_items(393)


def test_capped_retention_caps_at_one():
    assert capped_retention({}) is None
    assert capped_retention({"a": 0.7, "b": 1.3}) == pytest.approx(0.85)  # uncapped would be 1.0
    assert capped_retention({"a": 1.2, "b": 1.5}) == pytest.approx(1.0)
    assert capped_retention({"a": 0.6, "b": 0.8}) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="'b'"):
        capped_retention({"a": 0.9, "b": math.nan})


def test_small_continuous_suites_use_students_t():
    """Four chunks that all moved the same way: a bootstrap would call it significant whatever the spread; the
    paired t-test weighs the spread with 3 degrees of freedom (t = 3.182 at 95%)."""
    from ftlab.evals.stats import t_quantile

    assert t_quantile(0.975, 3) == pytest.approx(3.182, abs=1e-3) and t_quantile(0.975, 1) == pytest.approx(
        12.706, 1e-3
    )
    before, after = [10.0, 20.0, 30.0, 40.0], [10.5, 21.5, 30.2, 44.0]  # diffs 0.5, 1.5, 0.2, 4.0
    change = paired_change(before, after)
    diffs = [0.5, 1.5, 0.2, 4.0]
    half = 3.182 * stderr(diffs)
    assert change.method == "paired-t" and change.delta == pytest.approx(1.55)
    assert (change.ci_low, change.ci_high) == pytest.approx((1.55 - half, 1.55 + half), abs=2e-3)
    assert not change.significant and 0.1 < change.p_value < 0.3  # all four rose, but the spread is wide
    steady = paired_change(before, [b + 1.0 + 0.01 * i for i, b in enumerate(before)])
    assert steady.significant and steady.p_value < 1e-3
