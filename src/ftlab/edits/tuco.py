"""TuCo forward pass: scale the fine-tuning component along the residual stream (Nuti et al., ICML 2025).

Paper: arXiv 2506.23423; docs/methods.md, "TuCo". Every block l of the tuned model is a residual update
x_{l+1} = x_l + f^FT(x_l). On the tuned model's own trajectory, PTC_l = f^PT(x_l) (the base block on the same
hidden state) and FTC_l = f^FT(x_l) − f^PT(x_l), so x_{l+1} = x_l + PTC_l + FTC_l exactly. ``TuCoModel`` runs
x_{l+1} = x_l + PTC_l + α·FTC_l: α = 1 is the tuned model, α = 0 approximately the base, α > 1 amplifies the
fine-tune. Embedding, final norm and LM head are the tuned model's.

How: a forward hook on each of the tuned model's decoder layers calls the base model's layer of the same index
with the very arguments the tuned layer received (hidden state, causal mask, rotary position embeddings, position
ids) and replaces the layer output by the mix, so both models' layers run in lockstep on one hidden state and
the tuned model's own forward builds masks and positions (any HF decoder whose blocks are residual updates).
The mix is computed as out_FT + (α − 1)·(out_FT − out_PT), so α = 1 gives the tuned logits bit for bit.
No KV cache: every call recomputes the whole sequence (the paper notes that generation with the mixed
trajectory needs its own caches for both models; recomputing sidesteps that at O(T²) cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ftlab.params import block_prefix


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers`` for Llama, ``transformer.h`` for GPT-2...)."""
    prefix = block_prefix([name for name, _ in model.named_parameters()])
    if prefix is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    layers = model.get_submodule(prefix)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"'{prefix}' of {type(model).__name__} is not a list of blocks")
    return layers


class TuCoModel:
    """The tuned model with its fine-tuning component scaled by ``alpha`` in every block.

    Callable as ``obj(input_ids=..., attention_mask=...)``; returns the tuned model's output object (``.logits``
    of shape B, T, V). ``.device`` is the tuned model's device.

    Args:
        base_model: the pre-trained model.
        tuned_model: its fine-tune (same architecture and block count).
        alpha: scale of the fine-tuning component (1 = tuned model).
    """

    def __init__(self, base_model: PreTrainedModel, tuned_model: PreTrainedModel, alpha: float = 1.0) -> None:
        self.base_model, self.tuned_model, self.alpha = base_model, tuned_model, float(alpha)
        self.base_layers = decoder_layers(base_model)
        self.tuned_layers = decoder_layers(tuned_model)
        if len(self.base_layers) != len(self.tuned_layers):
            raise ValueError(
                f"base has {len(self.base_layers)} blocks, tuned {len(self.tuned_layers)}; TuCo needs both equal"
            )
        if base_model.device != tuned_model.device:
            raise ValueError(f"base on {base_model.device}, tuned on {tuned_model.device}; put both on one device")

    @property
    def device(self) -> torch.device:
        return self.tuned_model.device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        with self.mixing(self.alpha):
            return self.tuned_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    @contextmanager
    def mixing(self, alpha: float, record: list[dict[str, torch.Tensor]] | None = None) -> Iterator[None]:
        """While active, the tuned model's forward mixes in the base blocks; ``record`` gets x, PTC, FTC per block."""
        handles = []
        for base_layer, tuned_layer in zip(self.base_layers, self.tuned_layers, strict=True):
            hook = _mix_hook(base_layer, alpha, record)
            handles.append(tuned_layer.register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _mix_hook(base_layer: nn.Module, alpha: float, record: list[dict[str, torch.Tensor]] | None):
    busy = [False]  # when base and tuned are one object, the base call re-enters this hook: pass it through

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if busy[0]:
            return output
        x = args[0] if args else kwargs["hidden_states"]
        out_ft = output[0] if isinstance(output, tuple) else output
        busy[0] = True
        try:
            out_pt = base_layer(*args, **kwargs)
        finally:
            busy[0] = False
        out_pt = out_pt[0] if isinstance(out_pt, tuple) else out_pt
        if record is not None:
            record.append({"x": x, "ptc": out_pt - x, "ftc": out_ft - out_pt})
        mixed = out_ft if alpha == 1.0 else out_ft + (alpha - 1.0) * (out_ft - out_pt)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    return hook


@torch.no_grad()
def components(
    base_model: PreTrainedModel,
    tuned_model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The decomposition of the tuned forward pass: per block, its input x_l, PTC_l and FTC_l (each B, T, D).

    Args:
        base_model: the pre-trained model.
        tuned_model: its fine-tune.
        input_ids: token ids, B x T.
        attention_mask: optional B x T mask.

    Returns:
        One dict per block with keys ``x``, ``ptc`` and ``ftc``; x_{l+1} = x_l + ptc_l + ftc_l.
    """
    record: list[dict[str, torch.Tensor]] = []
    tuco = TuCoModel(base_model, tuned_model)
    with tuco.mixing(1.0, record):
        tuned_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return record
