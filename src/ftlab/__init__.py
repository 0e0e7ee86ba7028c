"""ftlab: fine-tune language models and measure, and limit, what they forget.

A small Python API for notebooks and scripts (see docs/api.md), each name imported on first use so that
``import ftlab`` (and the command line) stays free of torch, sqlite3 and matplotlib:

- ``load_experiment(path, overrides)`` and ``run_experiment(cfg, store)``: ``ftlab run`` as two calls;
- ``load_model(ref)``: ``(model, tokenizer)`` from a hub id, a folder, an adapter folder or ``"tiny-test"``;
- ``evaluate(model, tokenizer, suites)``: ``{suite name: SuiteResult}`` for suite names, paths or ``Suite`` objects;
- ``edit(base_model, tuned_model, name, **settings)``: a weight edit (``scale``, ``lines``, ``reset``, ...) as a
  new model.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that spin while waiting make torch 10-20x slower on a busy small CPU; let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# name -> (module, attribute): resolved by ``__getattr__`` on first use.
_LAZY = {
    "load_experiment": ("ftlab.recipes.experiment", "load_experiment"),
    "run_experiment": ("ftlab.recipes.run", "run_experiment"),
    "load_model": ("ftlab.models", "load_model"),
    "edit": ("ftlab.edits", "edit_model"),
}
__all__ = ["__version__", "edit", "evaluate", "load_experiment", "load_model", "run_experiment"]


def evaluate(model: Any, tokenizer: Any, suites: Any, **kwargs: Any) -> dict[str, Any]:
    """Score a model on suites: ``{suite name: ftlab.evals.SuiteResult}``, in the order given.

    ``suites`` is one suite or a list of them, each a built-in name, a file or folder path (as ``ftlab eval --suite``
    takes) or a ``Suite`` (``ftlab.evals.load_suite(ref, scorer=..., limit=...)`` for a scorer or a limit).
    ``kwargs`` go to ``ftlab.evals.evaluate``: ``batch_size``, ``max_new_tokens``, ``progress``.
    """
    from ftlab.evals import Suite, evaluate_many, load_suite

    many = suites if isinstance(suites, (list, tuple)) else [suites]
    return evaluate_many(model, tokenizer, [s if isinstance(s, Suite) else load_suite(str(s)) for s in many], **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
