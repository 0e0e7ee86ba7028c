"""Methods that decide what a fine-tune changes, behind one explicit registry.

``METHODS`` maps a name to a module with ``NAME``, ``Config`` and ``plan(model, cfg, ctx) -> Plan``. Adding a method
is one new module, one line here, and a test; ``tests/test_methods_contract.py`` then runs the common battery on it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ftlab.config import ConfigError, from_dict
from ftlab.methods import freeze, full, hft, lift, locft, lora, sparse
from ftlab.methods.base import Plan, PlanContext, apply_plan, optimizer_state_bytes, trainable_count

METHODS: dict[str, ModuleType] = {
    full.NAME: full,
    lora.NAME: lora,
    hft.NAME: hft,
    lift.NAME: lift,
    sparse.NAME: sparse,
    freeze.NAME: freeze,
    locft.NAME: locft,
}


def get_method(name: str) -> ModuleType:
    """The method module registered under ``name``."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config(name: str, params: dict[str, Any] | None) -> Any:
    """Validate ``params`` against the method's own Config dataclass (errors name ``method.params.<key>``)."""
    return from_dict(get_method(name).Config, params or {}, "method.params.")


__all__ = [
    "METHODS",
    "Plan",
    "PlanContext",
    "apply_plan",
    "get_method",
    "method_config",
    "optimizer_state_bytes",
    "trainable_count",
]
