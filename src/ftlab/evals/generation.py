"""Batched greedy generation for evaluation, for Hugging Face models and for bare logits callables.

* A Hugging Face model (anything with ``generate`` and a ``generation_config``, PEFT models included) runs our
  greedy loop with KV cache: prompts sorted by length, left padding, ``position_ids`` from the attention mask (as
  ``generate`` computes them), stop at EOS or end of turn. Unlike ``model.generate``, which keeps computing every
  row until the whole batch is done, finished rows leave the batch (``Cache.batch_select_indices``). The prompts'
  common token prefix (the chat template's system prompt and user tag) is run once per batch and its KV cache
  repeated over the rows: the layout is ``[prefix][padding][rest of prompt]``. On a CPU these two are most of the
  batched speed-up for short answers, since prompt processing costs the same per token batched or not.
  ``_generate_hf`` (``model.generate``) is the fallback for a model whose forward returns no batch-selectable
  cache, and the test reference for the loop.
* Any other object callable as ``model(input_ids=..., attention_mask=...)`` that returns ``.logits`` and has
  ``.device`` (decode-time composites such as EFT or TuCo) gets a greedy loop without KV cache. That loop pads on
  the **right** and reads each row's logits at its own last token, so every row keeps positions 0..n-1 without
  needing ``position_ids`` from the caller. Rows that have stopped are dropped from later forwards.

Prompts go through the tokenizer's chat template as one user turn when it has one; otherwise they are used as is.
Outputs are cut at the first stop token and decoded without special tokens. Greedy ties break to the lowest token
id in every path, so the text does not depend on the batch size (up to float rounding between batch shapes).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

# Run transformers' ``model.generate`` instead of the loop below for Hugging Face models. Off: bench/eval_speed.py
# measured the loop at 1.43x ``generate`` on the same prompts and batch size with identical answers (docs/speed.md).
USE_GENERATE = False
# Shared prompt prefixes shorter than this are not worth a separate forward.
MIN_SHARED_PREFIX = 4
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


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Put a module in eval mode (dropout off) for the block and restore training mode after, if it was on."""
    was_training = bool(getattr(model, "training", False))
    if was_training and callable(getattr(model, "eval", None)):
        model.eval()
    try:
        yield
    finally:
        if was_training and callable(getattr(model, "train", None)):
            model.train()


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


def _accepts(model, name: str) -> bool:
    """Whether the model's forward (the base model's, for PEFT) takes a keyword ``name``."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return name in inspect.signature(base.forward).parameters


def _cache_of(out) -> object | None:
    """The KV cache of a forward output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences, capped so every sequence keeps one token after it."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)


@torch.no_grad()
def _generate_cached(
    model, batch: list[list[int]], max_new_tokens: int, stop: list[int], pad: int, prefix_len: int = 0
) -> list[list[int]]:
    """Greedy decoding with a KV cache; the first ``prefix_len`` tokens (shared by every prompt) are run once.

    Falls back to ``model.generate`` when the forward returns no cache that can select or repeat batch rows.
    """
    dev = model_device(model)
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    has_pos, has_keep = _accepts(model, "position_ids"), _accepts(model, "logits_to_keep")
    keep_last = {"logits_to_keep": 1} if has_keep else {}  # only the last position's logits are ever needed
    P = prefix_len if has_pos else 0  # a shared prefix needs explicit positions after the padding hole
    cache = None
    if P:
        out = model(input_ids=torch.tensor([batch[0][:P]], device=dev), use_cache=True, **keep_last)
        cache = _cache_of(out)
        if cache is None or not callable(getattr(cache, "batch_repeat_interleave", None)):
            return _generate_hf(model, batch, max_new_tokens, stop, pad)
        cache.batch_repeat_interleave(len(batch))
    width = max(len(x) for x in batch) - P
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), P + width), dtype=torch.long)
    mask[:, :P] = 1
    for r, x in enumerate(batch):  # [shared prefix][left padding][rest of the prompt]
        ids[r, width - (len(x) - P) :] = torch.tensor(x[P:])
        mask[r, P + width - (len(x) - P) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + W): real tokens at 0..n-1 whatever the padding
    extra = {"position_ids": pos[:, P:]} if has_pos else {}
    if cache is not None:
        extra[cache_kw] = cache
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra, **keep_last)
    cache = _cache_of(out)
    if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
        return _generate_hf(model, batch, max_new_tokens, stop, pad)
    outputs: list[list[int]] = [[] for _ in batch]
    rows = list(range(len(batch)))  # batch row -> prompt index, for the rows still generating
    stop_set = set(stop)
    nxt, last_pos = out.logits[:, -1].argmax(-1), pos[:, -1]
    for step in range(max_new_tokens):
        tokens = nxt.tolist()
        keep = [k for k, tok in enumerate(tokens) if tok not in stop_set]
        for k in keep:
            outputs[rows[k]].append(tokens[k])
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows from the cache and every per-row tensor
            sel = torch.tensor(keep, device=dev)
            cache.batch_select_indices(sel)
            mask, last_pos, nxt = mask[sel], last_pos[sel], nxt[sel]
            rows = [rows[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        last_pos = last_pos + 1
        step_kw = {cache_kw: cache, **({"position_ids": last_pos[:, None]} if has_pos else {})}
        out = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True, **step_kw)
        cache, nxt = _cache_of(out), out.logits[:, -1].argmax(-1)
    return outputs


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
        model: a Hugging Face causal LM (KV-cache loop) or a logits callable with ``.device`` (loop without cache).
            A model in training mode is switched to eval mode for the call (no dropout) and back afterwards.
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
    hf = is_hf_generator(model)
    # The chat template's opening (system prompt, user tag) is shared by every prompt: with more than one row in a
    # batch its KV is computed once and repeated; a batch of one has nothing to share and runs in one forward.
    prefix = common_prefix_len(encoded)
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    # Longest prompts first: less padding per batch, and an out-of-memory error shows up on the first batch.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in encoded]
    bar = _progress(len(encoded), progress, "generate")
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [encoded[i] for i in idx]
            if hf and USE_GENERATE:
                outs = _generate_hf(model, rows, max_new_tokens, stop, pad)
            elif hf:
                share = prefix if len(rows) > 1 else 0
                outs = _generate_cached(model, rows, max_new_tokens, stop, pad, prefix_len=share)
            else:
                outs = _generate_loop(model, rows, max_new_tokens, stop, pad)
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
            bar.update(len(idx))
    bar.close()
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in results]


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr; ``FTLAB_PROGRESS=0`` in the environment turns every bar off."""
    from tqdm.auto import tqdm

    enabled = enabled and os.environ.get("FTLAB_PROGRESS", "1") != "0"
    return tqdm(total=total, disable=not enabled, file=sys.stderr, desc=desc, leave=False)
