"""EFT up-scaling: decode-time combination of a large base with a small fine-tune's delta (Mitchell et al., ICLR 2024).

Paper: arXiv 2310.12962; docs/methods.md, "EFT". At every position the combined logits are
    large_base + Σ_i w_i (small_tuned_i − small_base),
raw logits as in the reference implementation (the per-model log-softmax constants cancel in the final softmax);
temperature / top-p, when wanted, go on the combined logits. Up-scaling is one small fine-tune with w = 1;
down-scaling is the same object with a small base and a large fine-tune pair.

Differences from the reference (ZHZisZZ/emulated-disalignment): all models see the same input ids (the reference
can feed the fine-tuned model a chat template and the base models a plain one); no KV caches, every call
recomputes the sequence. Logits are cut to the shared vocabulary (the smallest logit width), which covers
embedding tables padded to different sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput


def check_shared_tokenizer(tokenizers: Sequence[PreTrainedTokenizerBase], names: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first difference unless all tokenizers map the same strings to the same ids."""
    names = list(names) if names else [f"model {i}" for i in range(len(tokenizers))]
    ref = tokenizers[0].get_vocab()
    for tok, name in zip(tokenizers[1:], names[1:], strict=True):
        vocab = tok.get_vocab()
        if vocab == ref:
            continue
        diff = sorted((set(ref.items()) ^ set(vocab.items())), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"EFT needs one shared tokenizer: {names[0]} ({len(ref)} tokens) and {name} ({len(vocab)} tokens) "
            f"differ, e.g. {diff}. Use models of one family (same vocabulary)."
        )


class EFTModel:
    """Emulated fine-tuning: ``large_base`` logits plus ``weight`` times the small fine-tune's logit delta.

    Callable as ``obj(input_ids=..., attention_mask=...)`` returning an object with ``.logits`` (B, T, V_shared);
    ``.device`` is the large model's device (inputs are moved to each model's own device).

    Args:
        large_base: the large pre-trained model (N).
        small_tuned: the small fine-tuned model (M), or several for a weighted sum of deltas.
        small_base: the small pre-trained model (M).
        weight: w, one per small fine-tune (1.0 = plain up-scaling).
        tokenizers: when given, the models' tokenizers (large base, small tuned..., small base), checked to share one
            vocabulary.
    """

    def __init__(
        self,
        large_base: PreTrainedModel,
        small_tuned: PreTrainedModel | Sequence[PreTrainedModel],
        small_base: PreTrainedModel,
        weight: float | Sequence[float] = 1.0,
        tokenizers: Sequence[PreTrainedTokenizerBase] | None = None,
    ) -> None:
        tuned = [small_tuned] if isinstance(small_tuned, PreTrainedModel) else list(small_tuned)
        weights = [float(weight)] * len(tuned) if isinstance(weight, (int, float)) else [float(w) for w in weight]
        if len(weights) != len(tuned):
            raise ValueError(f"{len(tuned)} small fine-tunes but {len(weights)} weights")
        self.large_base, self.small_tuned, self.small_base, self.weights = large_base, tuned, small_base, weights
        models = [large_base, *tuned, small_base]
        if tokenizers is not None:
            names = ["large base", *[f"small tuned {i}" for i in range(len(tuned))], "small base"]
            check_shared_tokenizer(tokenizers, names)
        else:
            sizes = {m.config.get_text_config().vocab_size for m in models}
            if len(sizes) > 1:
                raise ValueError(
                    f"vocabulary sizes differ {sorted(sizes)}; pass tokenizers= to check that they share one tokenizer"
                )

    @property
    def device(self) -> torch.device:
        return self.large_base.device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        def logits(model: PreTrainedModel) -> torch.Tensor:
            ids = input_ids.to(model.device)
            mask = attention_mask.to(model.device) if attention_mask is not None else None
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
            return out.to(self.device, torch.float32)  # B, T, V_model

        large = logits(self.large_base)
        small_base = logits(self.small_base)
        tuned = [logits(m) for m in self.small_tuned]
        V = min(t.shape[-1] for t in (large, small_base, *tuned))
        combined = large[..., :V].clone()
        for w, t in zip(self.weights, tuned, strict=True):
            combined += w * (t[..., :V] - small_base[..., :V])
        return CausalLMOutput(logits=combined)
