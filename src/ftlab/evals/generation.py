"""Batched greedy generation for evaluation, for Hugging Face models and for bare logits callables.

* A Hugging Face model (anything with ``generate`` and a ``generation_config``, PEFT models included) is run through
  ``model.generate``: prompts sorted by length, left padding, greedy, KV cache, stop at EOS or end of turn.
* Any other object callable as ``model(input_ids=..., attention_mask=...)`` that returns ``.logits`` and has
  ``.device`` (decode-time composites such as EFT or TuCo) gets our own greedy loop without KV cache. That loop pads
  on the **right** and reads each row's logits at its own last token, so every row keeps positions 0..n-1 without
  needing ``position_ids`` from the caller; the HF path gets the same positions from ``generate``, which derives
  ``position_ids`` from the attention mask. Rows that have stopped are dropped from later forwards.

Prompts go through the tokenizer's chat template as one user turn when it has one; otherwise they are used as is.
Outputs are cut at the first stop token and decoded without special tokens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

# End-of-turn markers of common chat formats; whichever exist in the vocabulary also stop generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def is_hf_generator(model: object) -> bool:
    """True when ``model`` is a Hugging Face (or PEFT) model with ``generate``; False for bare logits callables."""
    return callable(getattr(model, "generate", None)) and getattr(model, "generation_config", None) is not None


def model_device(model: object) -> torch.device:
    """Device of a model or logits callable (its ``.device``, else the first parameter's device, else CPU)."""
    dev = getattr(model, "device", None)
    if dev is not None:
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def uses_chat_template(tokenizer: object) -> bool:
    """True when the tokenizer has a chat template (prompts are then sent as one user turn)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (user turn + generation prompt) when there is one.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: user messages.
        chat: force the chat template on or off (default: on when the tokenizer has one).

    Returns:
        One list of token ids per prompt.
    """
    chat = uses_chat_template(tokenizer) if chat is None else chat
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # The template already writes any BOS / special tokens it wants.
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def stop_token_ids(model: object, tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's and model's EOS, plus known end-of-turn markers in the vocab."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if i is not None:
            ids.add(int(i))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return int(pad)


def _cut(ids: Sequence[int], stop: set[int]) -> list[int]:
    out = []
    for i in ids:
        if i in stop:
            break
        out.append(int(i))
    return out


@torch.no_grad()
def _generate_hf(model, batch: list[list[int]], max_new_tokens: int, stop: list[int], pad: int) -> list[list[int]]:
    from transformers import GenerationConfig

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):  # left padding: the prompt ends at the last column
        ids[r, width - len(x) :] = torch.tensor(x)
        mask[r, width - len(x) :] = 1
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad
    )
    dev = model_device(model)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config)
    return [_cut(row[width:].tolist(), set(stop)) for row in out.cpu()]


@torch.no_grad()
def _generate_loop(model, batch: list[list[int]], max_new_tokens: int, stop: list[int], pad: int) -> list[list[int]]:
    B = len(batch)
    lens = torch.tensor([len(x) for x in batch])
    ids = torch.full((B, int(lens.max()) + max_new_tokens), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(batch):  # right padding: row r's tokens sit at positions 0..lens[r]-1
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    outputs: list[list[int]] = [[] for _ in range(B)]
    active = torch.arange(B)
    stop_set = set(stop)
    dev = model_device(model)
    for _ in range(max_new_tokens):
        width = int(lens[active].max())
        logits = model(input_ids=ids[active, :width].to(dev), attention_mask=mask[active, :width].to(dev)).logits
        # logits: (B_active, width, V); each row's next token comes from its own last real position.
        nxt = logits[torch.arange(len(active)), (lens[active] - 1).to(logits.device)].argmax(-1).cpu()
        keep = []
        for r, tok in zip(active.tolist(), nxt.tolist(), strict=True):
            if tok in stop_set:
                continue
            outputs[r].append(tok)
            ids[r, lens[r]] = tok
            mask[r, lens[r]] = 1
            lens[r] += 1
            keep.append(r)
        if not keep:
            break
        active = torch.tensor(keep)
    return outputs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    progress: bool = True,
    chat: bool | None = None,
) -> list[str]:
    """Greedy responses to ``prompts``, batched; the result does not depend on ``batch_size``.

    Args:
        model: a Hugging Face causal LM (uses ``generate``) or a logits callable with ``.device``.
        tokenizer: its tokenizer.
        prompts: user messages (chat template applied when the tokenizer has one).
        batch_size: prompts per forward batch.
        max_new_tokens: cap on generated tokens per prompt.
        progress: show a progress bar on stderr.
        chat: force the chat template on or off.

    Returns:
        The decoded responses, in the order of ``prompts``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_prompts(tokenizer, prompts, chat)
    stop, pad = stop_token_ids(model, tokenizer), _pad_id(tokenizer)
    run = _generate_hf if is_hf_generator(model) else _generate_loop
    # Longest prompts first: less padding per batch, and an out-of-memory error shows up on the first batch.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in encoded]
    bar = _progress(len(encoded), progress, "generate")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, out in zip(idx, run(model, [encoded[i] for i in idx], max_new_tokens, stop, pad), strict=True):
            results[i] = out
        bar.update(len(idx))
    bar.close()
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in results]


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr; ``FTLAB_PROGRESS=0`` in the environment turns every bar off."""
    from tqdm.auto import tqdm

    enabled = enabled and os.environ.get("FTLAB_PROGRESS", "1") != "0"
    return tqdm(total=total, disable=not enabled, file=sys.stderr, desc=desc, leave=False)
