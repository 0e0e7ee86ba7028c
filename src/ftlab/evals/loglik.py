"""Log-likelihood scoring from forward logits: multiple choice and perplexity.

Both work with a Hugging Face model or any logits callable (``model(input_ids=..., attention_mask=...).logits``),
because they only need one forward pass per sequence. Sequences are padded on the **right**, so every token keeps
its natural position whatever the model does with ``position_ids``.

* Multiple choice (lm-evaluation-harness style): for each option, the summed log-probability of the continuation
  ``" " + option`` after the context. ``choice`` picks the highest sum; ``choice_norm`` divides the sum by the
  byte length of the continuation ``" " + option`` first. lm-eval's ``acc_norm`` divides by the option's length in
  characters without the space; on the first 200 ARC-Easy test items of the embedded model the two pick differently
  on 4 items (ftlab 0.485, lm-eval 0.465; ``acc`` agrees on every item, 0.510). Context and continuation are
  tokenised separately and concatenated, so the continuation tokens are exactly the option's. No chat template is
  used. Items whose options are all single tokens (MMLU's letters) are scored from one forward of the context.
* Perplexity: each text is tokenised with the tokenizer's default special tokens and cut into windows of at most
  ``max_length`` tokens; each window after the first starts with the previous window's last token as context, so
  every token but the very first is scored exactly once. Corpus perplexity is ``exp(sum NLL / sum tokens)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ftlab.evals.generation import _progress, is_hf_generator, model_device

# Score multiple-choice options over a shared context's KV cache (``shared_context_logprobs``); tests switch it off
# to compare with one sequence per option.
SHARE_CONTEXT = True


@torch.no_grad()
def _forward_each(
    model,
    seqs: Sequence[Sequence[int]],
    take: Callable[[torch.Tensor, int], torch.Tensor],
    batch_size: int,
    max_batch_tokens: int,
    progress: bool,
) -> list[torch.Tensor]:
    """Run right-padded batches of ``seqs`` and apply ``take(logits of sequence j (T_j, V), j)`` to each."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    dev = model_device(model)
    extra = {"use_cache": False} if is_hf_generator(model) else {}
    bar = _progress(len(seqs), progress, "score")
    i = 0
    while i < len(order):
        width = len(seqs[order[i]])
        n = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
        idx = order[i : i + n]
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(idx):
            ids[r, : len(seqs[j])] = torch.tensor(list(seqs[j]))
            mask[r, : len(seqs[j])] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **extra).logits  # (B, T, V)
        for r, j in enumerate(idx):
            out[j] = take(logits[r, : len(seqs[j])], j).cpu()
        del logits
        bar.update(len(idx))
        i += len(idx)
    bar.close()
    return out


def sequence_logprobs(
    model,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    batch_size: int = 16,
    max_batch_tokens: int = 4096,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Log-probability of each token ``seq[start:]`` given the tokens before it.

    Args:
        model: a Hugging Face causal LM or a logits callable with ``.device``.
        seqs: token id sequences.
        starts: index of the first scored token in each sequence (>= 1).
        batch_size: most sequences per forward.
        max_batch_tokens: most padded tokens per forward (bounds the ``(B, T, V)`` logits in memory).
        progress: show a progress bar on stderr.

    Returns:
        One float32 CPU tensor of shape ``(len(seq) - start,)`` per sequence, in input order.
    """
    for s, seq in zip(starts, seqs, strict=True):
        if not 1 <= s <= len(seq):
            raise ValueError(f"scored tokens must start at an index in 1..{len(seq)}, got {s}")

    def take(logits: torch.Tensor, j: int) -> torch.Tensor:
        # Logits at position p predict token p + 1.
        lp = logits[starts[j] - 1 : -1].float().log_softmax(-1)
        target = torch.tensor(list(seqs[j][starts[j] :]), device=lp.device)
        return lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    return _forward_each(model, seqs, take, batch_size, max_batch_tokens, progress)


def next_token_logprobs(
    model, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], batch_size: int = 16
) -> list[torch.Tensor]:
    """Log-probability of each candidate token right after each context (one forward per context).

    Args:
        model: a Hugging Face causal LM or a logits callable with ``.device``.
        contexts: token id sequences (non-empty).
        candidates: per context, the token ids to score.
        batch_size: most sequences per forward.

    Returns:
        Per context, a float32 CPU tensor ``(len(candidates[j]),)``.
    """

    def take(logits: torch.Tensor, j: int) -> torch.Tensor:
        lp = logits[-1].float().log_softmax(-1)
        return lp[torch.tensor(list(candidates[j]), device=lp.device)]

    return _forward_each(model, contexts, take, batch_size, 4096, False)


@torch.no_grad()
def shared_context_logprobs(
    model, contexts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]], batch_size: int = 16
) -> list[list[torch.Tensor]] | None:
    """Per item, per option, the log-probability of each option token after the item's context, with the context
    run once per item and all its options in one batch over the context's KV cache.

    Items go in batches of up to ``batch_size`` contexts: one forward over the right-padded contexts, then one over
    every option of those items, each option row reading its own item's cache row (the padding after a shorter
    context is masked out, and the options' ``position_ids`` continue from the context's true length). The first
    option token is scored from the context's last logits. This computes ``len(context) + sum(len(option))`` tokens
    per item instead of ``len(options) * len(context) + sum(len(option))``.

    Returns:
        The log-probabilities, or None when the model is not a Hugging Face model with a row-selectable KV cache
        and ``position_ids`` (the caller then scores each ``context + option`` sequence on its own).
    """
    from ftlab.evals.generation import _accepts, _cache_of

    if not is_hf_generator(model) or not _accepts(model, "position_ids"):
        return None
    dev = model_device(model)
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    result: list[list[torch.Tensor]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(contexts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(contexts[i])] = torch.tensor(list(contexts[i]))
            mask[r, : len(contexts[i])] = 1
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
        cache = _cache_of(out)
        if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
            return None
        lens = [len(contexts[i]) for i in idx]
        first = out.logits[torch.arange(len(idx)), torch.tensor(lens) - 1].float().log_softmax(-1).cpu()  # (B, V)
        rows = [(r, c) for r, i in enumerate(idx) for c in range(len(options[i]))]  # option row -> (item row, option)
        owidth = max(len(options[idx[r]][c]) for r, c in rows)
        oids = torch.zeros((len(rows), owidth), dtype=torch.long)
        omask = torch.zeros((len(rows), width + owidth), dtype=torch.long)
        pos = torch.zeros((len(rows), owidth), dtype=torch.long)
        for k, (r, c) in enumerate(rows):
            opt = list(options[idx[r]][c])
            oids[k, : len(opt)] = torch.tensor(opt)
            omask[k, :width] = mask[r]
            omask[k, width : width + len(opt)] = 1
            pos[k] = lens[r] + torch.arange(owidth)
        cache.batch_select_indices(torch.tensor([r for r, _ in rows], device=dev))
        logits = model(
            input_ids=oids.to(dev), attention_mask=omask.to(dev), position_ids=pos.to(dev), use_cache=True,
            **{cache_kw: cache},
        ).logits  # fmt: skip
        for k, (r, c) in enumerate(rows):
            opt = list(options[idx[r]][c])
            lp = [first[r, opt[0]]]
            if len(opt) > 1:
                rest = logits[k, : len(opt) - 1].float().log_softmax(-1).cpu()
                lp += list(rest.gather(-1, torch.tensor(opt[1:]).unsqueeze(-1)).squeeze(-1))
            result[idx[r]].append(torch.stack([torch.as_tensor(x) for x in lp]))
        del out, logits, cache
    return result


def _context_ids(tokenizer, context: str) -> list[int]:
    ids = tokenizer(context)["input_ids"]
    if not ids:  # an empty context still needs one token to condition on
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


def choice_logliks(
    model, tokenizer, items: Sequence[dict], batch_size: int = 16, progress: bool = False
) -> list[list[tuple[float, int]]]:
    """Summed log-likelihood of each option of each multiple-choice item.

    When every option of an item is a single token (MMLU's letters), one forward of the context scores them all;
    otherwise a Hugging Face model runs the context once and all the item's options in one batch over its KV cache
    (``shared_context_logprobs``), and a logits callable scores each ``context + option`` sequence on its own.

    Args:
        model: a Hugging Face causal LM or a logits callable.
        tokenizer: its tokenizer.
        items: dicts with ``prompt`` (the context) and ``choices`` (option strings).
        batch_size: most sequences per forward.
        progress: show a progress bar on stderr.

    Returns:
        Per item, per option, ``(sum log-prob, UTF-8 byte length of the continuation)``.
    """
    long_ctx, long_conts, long_items = [], [], []  # items with a multi-token option
    short_ctx, short_cands, short_items = [], [], []  # one context per item whose options are single tokens
    nbytes = []
    for k, item in enumerate(items):
        ctx = _context_ids(tokenizer, item["prompt"])
        conts = [tokenizer(" " + str(c), add_special_tokens=False)["input_ids"] for c in item["choices"]]
        nbytes.append([len((" " + str(c)).encode("utf-8")) for c in item["choices"]])
        if all(len(c) == 1 for c in conts):
            short_ctx.append(ctx)
            short_cands.append([c[0] for c in conts])
            short_items.append(k)
            continue
        long_ctx.append(ctx)
        long_conts.append(conts)
        long_items.append(k)
    sums: list[list[float]] = [[0.0] * len(item["choices"]) for item in items]
    shared = shared_context_logprobs(model, long_ctx, long_conts, batch_size) if SHARE_CONTEXT and long_ctx else None
    if shared is not None:
        for k, lps in zip(long_items, shared, strict=True):
            sums[k] = [float(lp.sum()) for lp in lps]
    else:  # a logits callable: one sequence per (item, option)
        seqs, starts, owners = [], [], []
        for k, ctx, conts in zip(long_items, long_ctx, long_conts, strict=True):
            for c, cont in enumerate(conts):
                seqs.append(ctx + cont)
                starts.append(len(ctx))
                owners.append((k, c))
        lps = sequence_logprobs(model, seqs, starts, batch_size, progress=progress)
        for (k, c), lp in zip(owners, lps, strict=True):
            sums[k][c] = float(lp.sum())
    for k, lp in zip(short_items, next_token_logprobs(model, short_ctx, short_cands, batch_size), strict=True):
        sums[k] = [float(x) for x in lp]
    return [list(zip(s, nb, strict=True)) for s, nb in zip(sums, nbytes, strict=True)]


def pick_choice(logliks: Sequence[tuple[float, int]], normalize: bool) -> int:
    """Index of the best option (the first one on ties); ``normalize`` divides by the byte length."""
    scores = [ll / max(nb, 1) if normalize else ll for ll, nb in logliks]
    return max(range(len(scores)), key=lambda c: (scores[c], -c))


def text_nll(
    model, tokenizer, texts: Sequence[str], max_length: int = 1024, batch_size: int = 8, progress: bool = False
) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) and number of scored tokens for each text.

    Args:
        model: a Hugging Face causal LM or a logits callable.
        tokenizer: its tokenizer.
        texts: plain texts.
        max_length: most tokens per forward window.
        progress: show a progress bar on stderr.
        batch_size: most windows per forward.

    Returns:
        Per text, ``(sum NLL, scored tokens)``; texts of fewer than 2 tokens give ``(0.0, 0)``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    seqs, owners = [], []
    for t, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        # Window k covers ids[k*step : k*step + max_length]; consecutive windows share one token of context.
        step = max_length - 1
        for begin in range(0, max(len(ids) - 1, 0), step):
            seqs.append(ids[begin : begin + max_length])
            owners.append(t)
    lps = sequence_logprobs(
        model, seqs, [1] * len(seqs), batch_size=batch_size, max_batch_tokens=4096, progress=progress
    )
    totals = [(0.0, 0)] * len(texts)
    for t, lp in zip(owners, lps, strict=True):
        s, k = totals[t]
        totals[t] = (s - float(lp.sum()), k + lp.numel())
    return totals
