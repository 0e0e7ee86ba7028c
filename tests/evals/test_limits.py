"""Limits that sample fairly: ``load_suite(ref, limit=N)`` on a suite of several subjects takes each one's share."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ftlab.evals import load_suite
from ftlab.evals.suites import limit_items


def mmlu_folder(tmp_path: Path, sizes: dict[str, int], name: str = "mmlu") -> Path:
    """An MMLU-style folder: one headerless CSV per subject (question, A, B, C, D, answer letter)."""
    folder = tmp_path / name
    folder.mkdir()
    for subject, size in sizes.items():
        rows = [f"{subject} question {k}?,a{k},b{k},c{k},d{k},{'ABCD'[k % 4]}\n" for k in range(size)]
        (folder / f"{subject}_val.csv").write_text("".join(rows), encoding="utf-8")
    return folder


def test_each_subject_gets_its_share(tmp_path):
    folder = mmlu_folder(tmp_path, {"anatomy": 10, "astronomy": 10, "virology": 10})
    suite = load_suite(str(folder), limit=9)
    assert Counter(it["subject"] for it in suite.items) == {"anatomy": 3, "astronomy": 3, "virology": 3}
    # Each subject's first items, in the original order (subjects in sorted file order).
    assert [it["id"] for it in suite.items] == [
        f"{s}-{n}" for s in ("anatomy", "astronomy", "virology") for n in (1, 2, 3)
    ]
    # Not divisible: round-robin, the earlier subjects take the extra items.
    counts = Counter(it["subject"] for it in load_suite(str(folder), limit=8).items)
    assert counts == {"anatomy": 3, "astronomy": 3, "virology": 2}


def test_a_small_subject_gives_its_share_to_the_others(tmp_path):
    folder = mmlu_folder(tmp_path, {"anatomy": 10, "astronomy": 2, "virology": 10})
    items = load_suite(str(folder), limit=12).items
    assert Counter(it["subject"] for it in items) == {"anatomy": 5, "astronomy": 2, "virology": 5}
    assert len(load_suite(str(folder), limit=100).items) == 22


def test_limits_are_deterministic(tmp_path):
    folder = mmlu_folder(tmp_path, {"anatomy": 7, "astronomy": 5, "virology": 9})
    for limit in (1, 4, 10, 20):
        first = [it["id"] for it in load_suite(str(folder), limit=limit).items]
        again = [it["id"] for it in load_suite(str(folder), limit=limit).items]
        assert first == again and len(first) == limit
    assert [it["id"] for it in load_suite(str(folder), limit=2).items] == ["anatomy-1", "astronomy-1"]


def test_a_suite_without_subjects_keeps_its_first_items(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{k}", "answer": str(k)}) + "\n" for k in range(10)))
    assert [it["prompt"] for it in load_suite(str(path), limit=4).items] == ["q0", "q1", "q2", "q3"]
    single = mmlu_folder(tmp_path, {"anatomy": 6}, name="one-subject")
    assert [it["id"] for it in load_suite(str(single), limit=3).items] == ["anatomy-1", "anatomy-2", "anatomy-3"]
    facts = load_suite("world-facts").items  # built-in suites have no subject field: first N, unchanged
    assert load_suite("world-facts", limit=40).items == facts[:40]


def test_jsonl_records_with_a_subject_are_balanced(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"m{k}", "answer": "x", "subject": "math"} for k in range(6)]
    rows += [{"prompt": f"h{k}", "answer": "x", "subject": "history"} for k in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [it["prompt"] for it in load_suite(str(path), limit=4).items] == ["m0", "m1", "h0", "h1"]


def test_limit_items_keeps_original_order_and_ignores_no_limit():
    items = [{"id": i, "subject": s} for i, s in enumerate("aabbbcab")]
    assert [it["id"] for it in limit_items(items, 4)] == [0, 1, 2, 5]  # a: 0, 1; b: 2; c: 5, in file order
    assert [it["id"] for it in limit_items(items, 6)] == [0, 1, 2, 3, 5, 6]  # a: 0, 1, 6; b: 2, 3; c: 5
    assert limit_items(items, None) == items and limit_items(items, 50) == items
