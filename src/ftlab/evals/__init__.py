"""Evaluation: suites (built-in and from files), scorers, the batched runner and forgetting figures.

Typical use::

    from ftlab.evals import load_suite, evaluate_many
    results = evaluate_many(model, tokenizer, [load_suite("world-facts"), load_suite("general-text")])
"""

from ftlab.evals.forgetting import continual_metrics, forgetting_summary, retained_ratio, target_gain
from ftlab.evals.generation import generate
from ftlab.evals.loaders import SuiteFormatError
from ftlab.evals.runner import ItemResult, SuiteResult, evaluate, evaluate_many
from ftlab.evals.scorers import SCORERS
from ftlab.evals.suites import BUILTIN_SUITES, Suite, load_suite
from ftlab.tasks import SHORT_ANSWER, arithmetic_items, fictional_capitals, fictional_capitals_train_records

__all__ = [
    "BUILTIN_SUITES",
    "SCORERS",
    "SHORT_ANSWER",
    "ItemResult",
    "Suite",
    "SuiteFormatError",
    "SuiteResult",
    "arithmetic_items",
    "continual_metrics",
    "evaluate",
    "evaluate_many",
    "fictional_capitals",
    "fictional_capitals_train_records",
    "forgetting_summary",
    "generate",
    "load_suite",
    "retained_ratio",
    "target_gain",
]
