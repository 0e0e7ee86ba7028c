"""The shared vocabulary of parameter names: block index, module kind, name patterns, tied copies.

Methods (what trains), edits (what is repaired) and analyses (where a fine-tune lives) all speak about parameters by
name; they use these helpers so that "block 3" or "the output head" means the same thing everywhere.

- A key belongs to block ``i`` when it sits under the model's block list followed by ``.i.`` (``model.layers.3.``,
  ``transformer.h.3.``, ``encoder.layer.3.``). ``BLOCK_RE`` is the one pattern for it. For a whole state dict,
  ``block_prefix`` picks the prefix most keys share, so numbered submodules deeper down (MoE experts) never count as
  blocks; LiNeS's reference code matches the bare substring ``.i.``, which would (docs/methods.md, LiNeS).
- Patterns match whole dotted parts, never substrings: ``layers.2`` matches ``model.layers.2.mlp.up_proj.weight`` but
  not ``model.layers.20.mlp.up_proj.weight`` (the LocFT pitfall), and ``norm`` matches ``model.norm.weight`` but not
  ``input_layernorm``. A pattern part may use shell wildcards (``*norm``, ``*_proj``).
- ``tied_aliases`` finds an output head that is a copy of the input embedding (SmolLM2 ties them), so an edit can
  treat the pair as the one tensor the model holds.
"""

from __future__ import annotations

import re
from collections import Counter
from fnmatch import fnmatchcase

import torch
from torch import nn

from ftlab.config import ConfigError

# The container names HF decoders use for their block lists (Llama/Qwen/Mistral, GPT-2/GPT-J, BLOOM/Falcon, BERT).
BLOCK_RE = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|layer))\.(\d+)\.")
_EMBED_HINTS = ("embed", "wte", "wpe", "word_embeddings")

StateDict = dict[str, torch.Tensor]


def check_compatible(base_sd: StateDict, tuned_sd: StateDict, what: str = "tuned") -> None:
    """Raise a clear ValueError unless both state dicts have the same keys and shapes."""
    missing = sorted(set(base_sd) - set(tuned_sd))
    extra = sorted(set(tuned_sd) - set(base_sd))
    if missing or extra:
        raise ValueError(
            f"base and {what} state dicts differ in keys: only in base {missing[:5]}, only in {what} {extra[:5]} "
            "(are they the same architecture?)"
        )
    for k, v in base_sd.items():
        if v.shape != tuned_sd[k].shape:
            raise ValueError(f"shape of '{k}' differs: base {tuple(v.shape)} vs {what} {tuple(tuned_sd[k].shape)}")


def block_prefix(keys: list[str] | set[str]) -> str | None:
    """The prefix of the transformer block list (e.g. ``model.layers``): the one shared by most numbered keys."""
    counts: Counter[str] = Counter()
    for k in keys:
        m = BLOCK_RE.match(k)
        if m:
            counts[m.group(1)] += 1
    return counts.most_common(1)[0][0] if counts else None


def layer_index(key: str, prefix: str | None) -> int | None:
    """Block index of ``key`` when it sits directly under ``prefix`` (``prefix.<i>.``), else None."""
    if prefix is None or not key.startswith(prefix + "."):
        return None
    head = key[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def layer_map(keys: list[str] | set[str], n_layers: int | None = None) -> tuple[dict[str, int | None], int]:
    """Map every key to its block index (None outside the blocks) and return the block count.

    Args:
        keys: state-dict keys.
        n_layers: expected number of blocks (e.g. ``config.num_hidden_layers``); inferred from the keys when None.

    Returns:
        ``(key -> block index or None, n_layers)``.

    Raises:
        ValueError: when the indices found are not exactly ``0..n_layers-1``.
    """
    prefix = block_prefix(keys)
    mapping = {k: layer_index(k, prefix) for k in keys}
    found = sorted({i for i in mapping.values() if i is not None})
    if n_layers is None:
        n_layers = len(found)
    if found != list(range(n_layers)):
        raise ValueError(
            f"block indices under '{prefix}' are {found[:3]}..{found[-3:] if found else []}, "
            f"expected 0..{n_layers - 1}"
        )
    return mapping, n_layers


def module_kind(key: str) -> str:
    """Short module name of a key: ``q_proj``, ``input_layernorm``, ``embed_tokens``, ``lm_head``, ``norm``..."""
    parts = key.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    return parts[-1]


def is_embedding(key: str) -> bool:
    """Whether a key is an input embedding table (by name)."""
    return any(h in key for h in _EMBED_HINTS)


def tied_aliases(*sds: StateDict) -> dict[str, str]:
    """Output-head keys that are copies of the input embedding in every given state dict: ``{head: embed}``.

    ``state_dict()`` of a model with tied embeddings (SmolLM2) lists both ``lm_head.weight`` and
    ``model.embed_tokens.weight``. Edits that treat them as two tensors could give them different values, which
    the tied model cannot hold; the edit dispatcher edits the embedding once and copies it to the head.
    """
    first = sds[0]
    embeds = [k for k in first if is_embedding(k) and first[k].dim() == 2]
    heads = [k for k in first if ("lm_head" in k or "embed_out" in k) and first[k].dim() == 2]
    out = {}
    for h in heads:
        for e in embeds:
            if first[h].shape == first[e].shape and all(torch.equal(sd[h], sd[e]) for sd in sds):
                out[h] = e
                break
    return out


def layer_of(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to, or None for parameters outside the blocks."""
    m = BLOCK_RE.match(name)
    return int(m.group(2)) if m else None


def in_layer_name(name: str) -> str:
    """The part of a parameter name after its block prefix (``self_attn.q_proj.weight``); the name itself outside."""
    m = BLOCK_RE.match(name)
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
