"""Weight-space scaling of the fine-tuning delta: ``θ0 + factor·(θ_ft − θ0)``.

``factor`` in [0, 1] interpolates between base (0) and tuned (1), WiSE-FT style; ``factor > 1`` extrapolates
(amplifies the fine-tune) and ``factor < 0`` moves away from it. ``torch.lerp`` is used so that factor 0 returns
the base and factor 1 the tuned weights bit-identically. This is not TuCo's forward-pass scaling of the
fine-tuning component (``ftlab.edits.tuco``), which mixes the two models' block outputs at run time.
"""

from __future__ import annotations

import torch

from ftlab.edits.chunks import Inputs, Step, run_in_memory
from ftlab.params import StateDict

NAME = "scale"


def apply(base_sd: StateDict, tuned_sd: StateDict, factor: float = 1.0) -> StateDict:
    """Scale the task vector of every tensor by ``factor``.

    Args:
        base_sd: base (pre-trained) weights, fp32.
        tuned_sd: fine-tuned weights, same keys and shapes.
        factor: 0 gives the base, 1 the tuned model; other values interpolate or extrapolate.

    Returns:
        A new state dict.
    """
    return run_in_memory(prepare, base_sd, [tuned_sd], factor=factor)


def prepare(inputs: Inputs, factor: float = 1.0) -> Step:
    """The elementwise step of ``apply`` (``ftlab.edits.chunks``); needs no statistics."""
    return lambda key, rows, base, tuned: _lerp(base, tuned[0], factor)


def _lerp(base: torch.Tensor, tuned: torch.Tensor, weight: float) -> torch.Tensor:
    if not base.is_floating_point():
        return tuned.clone()
    # lerp computes end - (end - start)(1 - w) for w >= 0.5, so w == 1 gives `tuned` exactly and w == 0 `base`.
    return torch.lerp(base, tuned, float(weight))
