"""Data mixtures for a stage: weighted mixing of sources (replay of earlier stages, general data) and DMT schedules.

- :func:`mix` draws a seeded mixture whose per-source counts follow the weights exactly (largest-remainder rounding),
  not just in expectation, so two arms of a comparison see the same composition.
- :func:`dmt_stages` builds the two stages of DMT, Dual-stage Mixed Fine-tuning (Dong et al., "How Abilities in
  Large Language Models are Affected by Supervised Fine-tuning Data Composition", ACL 2024, arXiv 2310.05492;
  docs/methods.md, "DMT"): stage 1 is all specialised data mixed together; stage 2 is the complete general data plus
  a fraction ``k`` of *each* specialised set. No official code exists: ``k`` defaults to 1/256 (the value secondary
  notes report for the main setting, unconfirmed) and the k-subset is drawn once and kept fixed (also unconfirmed;
  the paper does not say whether it is re-sampled per epoch).

Records are returned as the same dict objects as in the sources (not copies); a record drawn twice appears twice.
"""

from __future__ import annotations

import random
from typing import Any


def mix(sources: list[list[dict[str, Any]]], weights: list[float], n: int | None = None, seed: int = 0) -> list[dict]:
    """A shuffled mixture with ``n * w_i / sum(w)`` records of source ``i`` (rounded so the counts sum to ``n``).

    Each source is drawn without replacement while it lasts; a source asked for more records than it holds is
    repeated whole (each pass in a fresh order), which is replay with repetition.

    Args:
        sources: lists of records (e.g. this stage's data, a replay of earlier stages, a general-instruction set).
        weights: non-negative weights, one per source (normalised here).
        n: size of the mixture; None takes the largest size in which no record repeats, ``min(len_i / w_i)``.
        seed: the draw and the order depend only on this seed.

    Returns:
        The mixed records.

    Raises:
        ValueError: on mismatched lengths, negative or all-zero weights, or an empty source with positive weight.
    """
    if len(sources) != len(weights):
        raise ValueError(f"mix: {len(sources)} sources but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix: weights must be non-negative and not all zero, got {weights}")
    for i, (src, w) in enumerate(zip(sources, weights, strict=True)):
        if w > 0 and not src:
            raise ValueError(f"mix: source {i} is empty but has weight {w}")
    total = sum(weights)
    shares = [w / total for w in weights]
    if n is None:
        n = int(min(len(src) / s for src, s in zip(sources, shares, strict=True) if s > 0) + 1e-9)  # 1e-9: float noise
    if n < 0:
        raise ValueError(f"mix: n must be >= 0, got {n}")
    counts = _quotas(shares, n)
    rng = random.Random(seed)
    out: list[dict] = []
    for src, count in zip(sources, counts, strict=True):
        out += _draw(src, count, rng)
    rng.shuffle(out)
    return out


def dmt_stages(
    specialised: list[list[dict[str, Any]]], general: list[dict[str, Any]], k: float = 1 / 256, seed: int = 0
) -> list[list[dict]]:
    """The two stages of DMT: ``[all specialised data, all general data + round(k * len) of each specialised set]``.

    Args:
        specialised: one record list per specialised ability (e.g. math, code).
        general: the general-instruction data (kept complete).
        k: fraction of each specialised set replayed in stage 2 (paper grid: 1, 1/4, 1/16, 1/64, 1/256).
        seed: seeds the shuffles and the fixed k-subsets.

    Returns:
        ``[stage1_records, stage2_records]``, each shuffled.
    """
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"dmt: k must be in [0, 1], got {k}")
    if not specialised or not general:
        raise ValueError("dmt: needs at least one specialised data set and a non-empty general data set")
    rng = random.Random(seed)
    stage1 = [r for src in specialised for r in src]
    rng.shuffle(stage1)
    stage2 = list(general)
    for src in specialised:
        stage2 += rng.sample(src, round(k * len(src)))  # sampled per data set, not over the pooled data
    rng.shuffle(stage2)
    return [stage1, stage2]


def _quotas(shares: list[float], n: int) -> list[int]:
    """Integer counts proportional to ``shares`` summing to ``n`` (largest remainder; ties to the earlier source)."""
    raw = [s * n for s in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(src: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` records of ``src``: whole shuffled passes, then a partial one."""
    out: list[dict] = []
    while len(out) < count:
        order = list(src)
        rng.shuffle(order)
        out += order[: count - len(out)]
    return out
