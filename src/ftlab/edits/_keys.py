"""State-dict helpers shared by the edits and analyses: block index of a key, module kind, key checks, tied copies.

A key belongs to block ``i`` only when it starts with the model's block prefix followed by ``.i.`` (for example
``model.layers.3.``), found once for the whole state dict. LiNeS's reference code matches the substring ``.i.``,
which also hits numbered submodules such as MoE experts; METHODS.md section 3 asks for the exact prefix.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

# The container names HF decoders use for their block lists (Llama/Qwen/Mistral, GPT-2/GPT-J, BLOOM/Falcon, ...).
_BLOCK_RE = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|layer))\.(\d+)\.")
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
        m = _BLOCK_RE.match(k)
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
