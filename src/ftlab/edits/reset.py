"""Reset part of a fine-tune to the base weights (the rest keeps its fine-tuned values).

``how`` chooses the part, a ``fraction`` of the parameters:
- ``random``: every entry independently with probability ``fraction`` (seeded);
- ``smallest``: the entries with the smallest |θ_ft − θ0| over the whole model (ties at the threshold are reset
  together), which keeps the largest changes;
- ``layers``: whole units from the input side (``order="bottom"``) or the output side (``"top"``); the units are
  the embeddings, each block, then the other non-block keys (final norm, head), round(fraction·units) of them.

``half_reset`` is the HFT "half-reset" observation (docs/methods.md, "Half-reset"; Hui et al., arXiv 2404.18466): per
block, copy back from the base half of each category (attention 2 of 4 matrices, norms 1 of 2; the MLP's 3
matrices: 1 in one half of the blocks and 2 in the other, the extra block of an odd count resetting 1, as the SSU
reimplementation does); embeddings and head keep their fine-tuned values. Categories are found by module name
(``attn``/``attention``, ``mlp``/``ffn``/``feed_forward``, ``norm``/``ln``); biases follow their matrix.
Reset entries are the base values bit for bit, and fraction 1 returns the base state dict exactly.

Like every weight edit, these run as passes over row chunks (``ftlab.edits.chunks``): ``smallest`` finds its
threshold in two counting passes (exactly the ``kthvalue`` over the whole model), ``random`` draws each chunk's mask
from a generator seeded by the seed, the key and the chunk, so streamed shards and in-memory state dicts agree.
"""

from __future__ import annotations

import random

import torch

from ftlab.edits.chunks import Inputs, Step, chunk_seed, kth_smallest, run_in_memory
from ftlab.params import StateDict, block_prefix, is_embedding, layer_map

NAME = "reset"
HOWS = ("random", "smallest", "layers")


def apply(
    base_sd: StateDict,
    tuned_sd: StateDict,
    fraction: float,
    how: str = "random",
    seed: int = 0,
    order: str = "bottom",
) -> StateDict:
    """Copy a ``fraction`` of the parameters back from the base.

    Args:
        base_sd: base weights, fp32.
        tuned_sd: fine-tuned weights, same keys and shapes.
        fraction: share of parameters to reset, in [0, 1].
        how: ``random``, ``smallest`` or ``layers`` (see the module docstring).
        seed: random seed for ``how="random"``.
        order: for ``how="layers"``, reset from the input side (``bottom``) or the output side (``top``).

    Returns:
        A new state dict.
    """
    return run_in_memory(prepare, base_sd, [tuned_sd], fraction=fraction, how=how, seed=seed, order=order)


def prepare(inputs: Inputs, fraction: float, how: str = "random", seed: int = 0, order: str = "bottom") -> Step:
    """Statistics passes and the elementwise step of ``apply`` (``ftlab.edits.chunks``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if how not in HOWS:
        raise ValueError(f"unknown reset how={how!r}; choose from {', '.join(HOWS)}")
    if how == "layers":
        if order not in ("bottom", "top"):
            raise ValueError(f"order must be 'bottom' or 'top', got {order!r}")
        return _keys_step(set(_layer_units(inputs.keys, fraction, order)))
    if fraction in (0.0, 1.0):
        return _keys_step(set(inputs.keys) if fraction == 1.0 else set())
    if how == "random":

        def random_step(key: str, rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
            # each entry independently with probability `fraction`: cheap on 100M+ entries, exact share in expectation
            gen = torch.Generator().manual_seed(chunk_seed(seed, key, rows))
            return torch.where(torch.rand(base.shape, generator=gen) < fraction, base, tuned[0])

        return random_step
    total = inputs.n_float()
    take = round(fraction * total)
    if take in (0, total):
        return _keys_step(set(inputs.keys) if take == total else set())
    (threshold,) = kth_smallest(lambda: ([(ts[0] - b).abs()] for _, _, b, ts in inputs.chunks()), [take])
    return lambda key, rows, base, tuned: torch.where((tuned[0] - base).abs() <= threshold, base, tuned[0])


def half_reset(base_sd: StateDict, tuned_sd: StateDict, seed: int = 0) -> StateDict:
    """HFT-style half-reset: copy half of each block's modules back from the base (module docstring).

    Args:
        base_sd: base weights, fp32.
        tuned_sd: fine-tuned weights, same keys and shapes.
        seed: seed of the random choice of modules.

    Returns:
        A new state dict.
    """
    return run_in_memory(prepare_half_reset, base_sd, [tuned_sd], seed=seed)


def prepare_half_reset(inputs: Inputs, seed: int = 0) -> Step:
    """The step of ``half_reset``: whole keys from the base, chosen from the key names alone."""
    return _keys_step(half_reset_keys(inputs.keys, seed))


def _keys_step(chosen: set[str]) -> Step:
    """Base values for the keys in ``chosen``, tuned values elsewhere (the drivers copy them into the output)."""
    return lambda key, rows, base, tuned: base if key in chosen else tuned[0]


def half_reset_keys(keys: list[str], seed: int = 0) -> set[str]:
    """Keys that ``half_reset`` copies back from the base."""
    layers, n = layer_map(keys)
    prefix = block_prefix(keys)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    # For an odd-sized category, the first ceil(n/2) shuffled blocks reset the smaller half.
    small_half = set(order[: (n + 1) // 2])
    chosen: set[str] = set()
    for ell in range(n):
        modules: dict[str, list[str]] = {}
        for k, i in layers.items():
            if i == ell:
                sub = k[len(f"{prefix}.{ell}.") :].rsplit(".", 1)[0]
                modules.setdefault(sub, []).append(k)
        for cat in ("attention", "mlp", "norm"):
            subs = sorted(s for s in modules if _category(s) == cat)
            m = len(subs)
            take = m // 2 if (m % 2 == 0 or ell in small_half) else (m + 1) // 2
            for s in rng.sample(subs, take):
                chosen.update(modules[s])
    return chosen


def _category(sub: str) -> str | None:
    last = sub.split(".")[-1]
    if "norm" in last or last.startswith("ln"):
        return "norm"
    if "attn" in sub or "attention" in sub:
        return "attention"
    if "mlp" in sub or "ffn" in sub or "feed_forward" in sub:
        return "mlp"
    return None


def _layer_units(keys: list[str], fraction: float, order: str) -> list[str]:
    """Keys of the first round(fraction·units) units, units being [embeddings, block 0..L-1, other non-block]."""
    layers, n = layer_map(keys)
    embeds = [k for k, i in layers.items() if i is None and is_embedding(k)]
    others = [k for k, i in layers.items() if i is None and not is_embedding(k)]
    units = [embeds] if embeds else []
    units += [[k for k, i in layers.items() if i == ell] for ell in range(n)]
    units += [others] if others else []
    if order == "top":
        units = units[::-1]
    take = round(fraction * len(units))
    return [k for unit in units[:take] for k in unit]
