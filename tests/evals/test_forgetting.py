"""Forgetting figures: target gain, retained ratio and the continual metrics, checked by hand."""

from __future__ import annotations

import math

import pytest

from ftlab.evals.forgetting import continual_metrics, forgetting_summary, retained_ratio, target_gain
from ftlab.evals.runner import SuiteResult


def test_methods_md_worked_example():
    # METHODS.md section 14: T = 2, R[1,1] = 0.9, R[2,1] = 0.6, R[2,2] = 0.8 -> ACC 0.7, GEM BWT -0.3, F 0.3.
    # Row 0 (before training) and R[1,2] are not given there; we pick 0.1, 0.2 and 0.5 so FWT = 0.5 - 0.2 = 0.3.
    R = [
        [0.1, 0.2],
        [0.9, 0.5],
        [0.6, 0.8],
    ]
    m = continual_metrics(R)
    assert m["acc"] == pytest.approx((0.6 + 0.8) / 2) == pytest.approx(0.7)
    assert m["bwt"] == pytest.approx(0.6 - 0.9) == pytest.approx(-0.3)
    assert m["fwt"] == pytest.approx(0.5 - 0.2)
    assert m["forgetting"] == pytest.approx(0.9 - 0.6) == pytest.approx(0.3)


def test_three_tasks_by_hand():
    R = [
        [0.0, 0.1, 0.2],
        [0.8, 0.3, 0.2],
        [0.9, 0.7, 0.4],
        [0.5, 0.6, 0.9],
    ]
    m = continual_metrics(R)
    assert m["acc"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    # BWT over tasks 1..T-1 with denominator T - 1 = 2.
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.6 - 0.7)) / 2)
    # FWT over tasks 2..T: R[1][2] - R[0][2] and R[2][3] - R[0][3].
    assert m["fwt"] == pytest.approx(((0.3 - 0.1) + (0.4 - 0.2)) / 2)
    # Forgetting uses the best earlier score: task 1 peaked at 0.9 (after stage 2), not the diagonal 0.8.
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.7 - 0.6)) / 2)


def test_single_task_has_no_transfer_terms():
    m = continual_metrics([[0.2], [0.7]])
    assert m["acc"] == pytest.approx(0.7)
    assert math.isnan(m["bwt"]) and math.isnan(m["fwt"]) and math.isnan(m["forgetting"])


@pytest.mark.parametrize("R", [[[0.1, 0.2]], [[0.1, 0.2], [0.3]], [[0.1], [0.2], [0.3]]])
def test_bad_matrix_shapes(R):
    with pytest.raises(ValueError, match="T \\+ 1"):
        continual_metrics(R)


def test_target_gain_and_retained_ratio():
    assert target_gain(0.05, 0.85) == pytest.approx(0.8)
    assert retained_ratio(0.6, 0.45, higher_is_better=True) == pytest.approx(0.75)
    # Perplexity rising from 10 to 12.5 keeps 0.8 of the model's quality.
    assert retained_ratio(10.0, 12.5, higher_is_better=False) == pytest.approx(0.8)
    assert retained_ratio(0.5, 0.5, higher_is_better=True) == 1.0
    assert retained_ratio(0.0, 0.0, higher_is_better=True) == 1.0
    assert math.isnan(retained_ratio(0.0, 0.3, higher_is_better=True))


def test_forgetting_summary_orients_each_metric():
    def result(name, score, hib):
        return SuiteResult(name, "m", score, 10, 0.0, hib, [])

    before = {"fc": result("fc", 0.0, True), "wf": result("wf", 0.5, True), "ppl": result("ppl", 20.0, False)}
    after = {"fc": result("fc", 0.9, True), "wf": result("wf", 0.4, True), "ppl": result("ppl", 25.0, False)}
    s = forgetting_summary(before, after, target="fc")
    assert s["target_gain"] == pytest.approx(0.9)
    assert s["retained"] == {"wf": pytest.approx(0.8), "ppl": pytest.approx(0.8)}
