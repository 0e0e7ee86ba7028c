"""Layer / module freezing: train only chosen blocks, chosen modules inside them, and chosen parameters outside.

The classic "train the top k layers" or "train only the MLPs" baselines, and the plain-selection building block that
LocFT refines. A parameter trains when its block index is in ``layers`` and (``modules`` is empty or one of its
patterns matches), or when one of the ``extra`` patterns matches it.

Patterns match whole dotted name parts, with shell wildcards per part: ``mlp.down_proj`` matches
``model.layers.3.mlp.down_proj.weight``; ``self_attn`` matches every attention parameter; ``*layernorm`` both block
norms; ``layers.2`` never matches block 20. A pattern that matches nothing is an error (a typo would otherwise
silently train nothing).

Config keys: ``layers`` (``"0-3,10"``; empty: every block), ``modules``, ``extra`` (``embed_tokens``, ``lm_head``,
``model.norm``). The default trains every block and freezes the embeddings, the head and the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ftlab.config import ConfigError
from ftlab.methods.base import Plan, PlanContext
from ftlab.params import in_layer_name, layer_of, matches, matches_any, n_layers, param_count, parse_layers

NAME = "freeze"


@dataclass
class Config:
    layers: str = ""  # block indices that train, e.g. "0-3,10" (inclusive ranges); empty: every block
    modules: list[str] = field(default_factory=list)  # patterns inside the blocks, e.g. ["mlp.down_proj"]; empty: all
    extra: list[str] = field(default_factory=list)  # patterns outside the blocks that also train, e.g. ["lm_head"]


def select(model: nn.Module, layers: list[int], modules: list[str], extra: list[str], where: str = "") -> set[str]:
    """Names of the parameters that train under a layer/module/extra selection.

    Args:
        model: the model.
        layers: block indices.
        modules: patterns matched against the name inside the block (empty: the whole block).
        extra: patterns matched against full names of any parameter.
        where: prefix for error messages (``method.params.``).

    Returns:
        The selected parameter names.

    Raises:
        ConfigError: when a pattern matches no parameter, or nothing is selected.
    """
    wanted = set(layers)
    names = [n for n, _ in model.named_parameters()]
    in_blocks = [n for n in names if layer_of(n) in wanted]
    for pattern in modules:
        if not any(matches(in_layer_name(n), pattern) for n in in_blocks):
            raise ConfigError(f"{where}modules: {pattern!r} matches no parameter in blocks {_span(layers)}")
    for pattern in extra:
        if not any(matches(n, pattern) for n in names):
            raise ConfigError(
                f"{where}extra: {pattern!r} matches no parameter of the model "
                "(a tied head appears only under its embedding's name, e.g. embed_tokens)"
            )
    chosen = {n for n in in_blocks if not modules or matches_any(in_layer_name(n), modules)}
    chosen |= {n for n in names if matches_any(n, extra)}
    if not chosen:
        raise ConfigError(f"{where}layers/modules/extra select no parameter")
    return chosen


def _span(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) < 8 else f"{layers[0]}..{layers[-1]}"


def plan(model: nn.Module, cfg: Config, ctx: PlanContext) -> Plan:
    """Train the selected blocks/modules/extras; freeze everything else.

    Args:
        model: the model.
        cfg: the selection.
        ctx: planning context (unused).

    Returns:
        A plan with the selected names as ``trainable``.
    """
    layers = parse_layers(cfg.layers, n_layers(model), "method.params.layers")
    trainable = select(model, layers, cfg.modules, cfg.extra, "method.params.")
    total = sum(p.numel() for p in model.parameters())
    count = param_count(model, trainable)
    return Plan(
        trainable=trainable,
        info={
            "layers": layers,
            "modules": cfg.modules,
            "extra": cfg.extra,
            "trainable_params": count,
            "trainable_fraction": round(count / total, 6),
        },
    )
