"""Parameter-name helpers shared by the methods that pick what trains: block indices, name patterns, linear weights.

Names are matched by whole dotted parts, never by substring: ``layers.2`` matches ``model.layers.2.mlp.up_proj.weight``
but not ``model.layers.20.mlp.up_proj.weight`` (the LocFT pitfall), and ``norm`` matches ``model.norm.weight`` but
not ``input_layernorm``. A pattern part may use shell wildcards (``*norm``, ``*_proj``).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from torch import nn

from ftlab.config import ConfigError

# The ModuleList that holds the transformer blocks: "layers" (Llama, Qwen, Mistral), "h" (GPT-2), "blocks".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to, or None for parameters outside the blocks."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def in_layer_name(name: str) -> str:
    """The part of a parameter name after its block prefix (``self_attn.q_proj.weight``); the name itself outside."""
    m = _LAYER_RE.search(name)
    return name[m.end() :] if m else name


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks (from the config when it says, else from the parameter names)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    found = [i for i in (layer_of(name) for name, _ in model.named_parameters()) if i is not None]
    if not found:
        raise ConfigError("the model has no numbered transformer blocks (no 'layers.N.' in its parameter names)")
    return max(found) + 1


def parse_layers(spec: str, n_layer: int, where: str = "layers") -> list[int]:
    """Block indices from a spec like ``"0-3,10"`` (ranges inclusive); an empty spec means every block.

    Args:
        spec: comma-separated indices and inclusive ``a-b`` ranges.
        n_layer: number of blocks in the model.
        where: field name for error messages.

    Returns:
        Sorted, de-duplicated indices.

    Raises:
        ConfigError: on bad syntax or an index outside ``0..n_layer-1``.
    """
    if not spec.strip():
        return list(range(n_layer))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"{where}: cannot read {part!r} in {spec!r}; write indices and ranges like '0-3,10'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_layer:
            raise ConfigError(f"{where}: {part.strip()!r} is outside 0-{n_layer - 1} (the model has {n_layer} blocks)")
        out.update(range(lo, hi + 1))
    return sorted(out)


def matches(name: str, pattern: str) -> bool:
    """True when the dotted parts of ``pattern`` match a contiguous run of the dotted parts of ``name``."""
    parts, want = name.split("."), pattern.split(".")
    for i in range(len(parts) - len(want) + 1):
        if all(fnmatchcase(p, w) for p, w in zip(parts[i : i + len(want)], want, strict=True)):
            return True
    return False


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when any pattern matches ``name`` (see ``matches``)."""
    return any(matches(name, p) for p in patterns)


def linear_weights(model: nn.Module) -> list[str]:
    """Names of the weights of every ``nn.Linear`` inside the transformer blocks (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            name = f"{mod_name}.weight" if mod_name else "weight"
            if layer_of(name) is not None:
                names.append(name)
    return names


def param_count(model: nn.Module, names: set[str]) -> int:
    """Total entries of the named parameters."""
    return sum(p.numel() for n, p in model.named_parameters() if n in names)
