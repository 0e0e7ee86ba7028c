"""Tuning contribution (TuCo) of a fine-tune, per prompt and per block (Nuti et al., ICML 2025, arXiv 2506.23423).

docs/methods.md, "TuCo" (Algorithm 1 of the paper). On the tuned model's forward pass, block l adds PTC_l (the base
block on the same hidden state) and FTC_l (the difference of the two blocks); see ``ftlab.edits.tuco``. For a
prompt, with the last token's components summed over blocks, I_FTC = Σ_l FTC_l[−1] and I_PTC = Σ_l PTC_l[−1]:
    TuCo = ‖I_FTC‖ / (‖I_PTC‖ + ‖I_FTC‖) ∈ [0, 1].
The per-block figure is the same ratio for block l alone, ‖FTC_l[−1]‖ / (‖PTC_l[−1]‖ + ‖FTC_l[−1]‖).

Choices where the paper is unclear (docs/methods.md marks them): the norm is configurable, default ℓ1; x0
is the tuned model's embedding. Prompts are wrapped in the tokenizer's chat template (user turn plus generation
prompt) when it has one and ``chat=True``, since the tuned model is usually a chat model; the paper compares
chat against plain inputs, so ``chat=False`` feeds the raw text.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftlab.edits.tuco import components

NORMS = {"l1": 1, "l2": 2}


def tuning_contribution(
    base_model: PreTrainedModel,
    tuned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    norm: str = "l1",
    chat: bool = True,
    ids: list[str] | None = None,
) -> dict:
    """TuCo of each prompt, per block and overall.

    Args:
        base_model: the pre-trained model.
        tuned_model: its fine-tune (same architecture), on the same device.
        tokenizer: the tuned model's tokenizer.
        prompts: the inputs.
        norm: ``l1`` (default) or ``l2``.
        chat: wrap prompts in the chat template when the tokenizer has one.
        ids: optional item ids reported beside each prompt.

    Returns:
        ``{"mean_tuco", "per_layer_mean", "prompts": [{"id", "tuco", "ftc_norm", "ptc_norm", "per_layer"}], "norm"}``.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if not prompts:
        raise ValueError("tuning_contribution needs at least one prompt")
    p = NORMS[norm]
    rows = []
    for i, prompt in enumerate(prompts):
        input_ids = encode_prompt(tokenizer, prompt, chat).to(tuned_model.device)  # 1 x T
        parts = components(base_model, tuned_model, input_ids)
        ptc = torch.stack([c["ptc"][0, -1] for c in parts]).double()  # L x D, last token
        ftc = torch.stack([c["ftc"][0, -1] for c in parts]).double()
        f_all, p_all = float(ftc.sum(0).norm(p)), float(ptc.sum(0).norm(p))
        f_l, p_l = ftc.norm(p, dim=1), ptc.norm(p, dim=1)
        rows.append(
            {
                "id": ids[i] if ids else str(i),
                "tuco": _ratio(f_all, p_all),
                "ftc_norm": f_all,
                "ptc_norm": p_all,
                "per_layer": [_ratio(float(f), float(q)) for f, q in zip(f_l, p_l, strict=True)],
            }
        )
    n_layers = len(rows[0]["per_layer"])
    return {
        "mean_tuco": sum(r["tuco"] for r in rows) / len(rows),
        "per_layer_mean": [sum(r["per_layer"][ell] for r in rows) / len(rows) for ell in range(n_layers)],
        "prompts": rows,
        "norm": norm,
        "n": len(rows),
    }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids (1 x T) of a prompt, chat-templated with a generation prompt when ``chat`` and a template exist."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
    return torch.tensor([ids])


def _ratio(f: float, p: float) -> float:
    return f / (p + f) if (p + f) > 0 else 0.0
