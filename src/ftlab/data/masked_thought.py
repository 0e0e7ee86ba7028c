"""Masked Thought (MFT): during SFT, replace a random fraction of the response tokens in the *input* by a mask token.

Paper: Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning
Learning of Language Models", ACL 2024, arXiv 2403.02178 (code: ChangyuChen347/MaskedThought).
See docs/methods.md, "Masked Thought".

What it does, as the authors' code does it:

- Only response tokens are eligible (every position whose label is not ``-100``: assistant turns, end-of-turn marker
  included); prompt tokens are never masked. Labels stay the original ids, so the loss is ordinary next-token
  cross-entropy on the untouched answer; the attention mask is unchanged (a replaced position stays attended).
- Each eligible token is replaced independently with probability ``p``, redrawn for every batch.
- ``p`` ramps linearly from 0 to ``ratio`` over the first ``warmup_ratio`` (default 2/3) of the optimizer steps, with
  the authors' formula ``p = ratio * step / (total_steps * warmup_ratio + 1)``, capped at ``ratio``.
- Replacement: ``"random"`` (a uniformly random vocabulary token, the authors' GSM8K script), ``"pad"`` (the pad
  token) or any token (id or string; e.g. a ``<mask>`` token added with :func:`add_mask_token`, whose embedding
  starts as the average embedding, as in the MetaMath/MAmmoTH scripts).

Where we differ: random replacement never draws the tokenizer's special tokens (pad, EOS, chat markers), so masking
cannot plant an end-of-turn marker inside an answer; the paper draws from the whole vocabulary. The step counter
counts the batches this collator has built (one optimizer step is ``grad_accum`` batches), which is exact even
though the data loader prefetches a batch ahead; :class:`MaskedThoughtCallback` syncs it with the trainer (total
steps, gradient accumulation, resumed runs). Use a separate plain collator for evaluation batches.

Use it with ``train_sft``::

    collator = MaskedThoughtCollator(tok, ratio=0.2, replace="random", seed=0)
    train_sft(model, tok, dataset, method, train, work_dir, data_collator=collator, callbacks=[collator.callback()])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ftlab.config import ConfigError
from ftlab.data.tokenize import IGNORE


@dataclass
class MaskedThoughtSettings:
    """The user-facing settings of Masked Thought (an arm's ``masked_thought:`` mapping in ``ftlab run``)."""

    ratio: float = 0.2  # final masking probability (paper: 0.2 for MATH/MetaMath, 0.4 for GSM8K)
    replace: str | int = "random"  # "random", "pad", a token id, or a token string of the tokenizer
    warmup_ratio: float = 2 / 3  # share of the steps over which the probability ramps up from 0

    def __post_init__(self) -> None:
        for name in ("ratio", "warmup_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"masked_thought.{name} must be in [0, 1], got {getattr(self, name)}")


class MaskedThoughtCollator:
    """Pads a batch like TRL's SFT collator, then masks response tokens of ``input_ids`` (labels unchanged).

    Args:
        tokenizer: the model's tokenizer (pad id, vocabulary size, special tokens).
        ratio: the final masking probability ``p`` (paper: 0.2 for MATH/MetaMath, 0.4 for GSM8K with random tokens).
        replace: ``"random"``, ``"pad"``, a token id, or a token string known to the tokenizer.
        warmup_ratio: fraction of the total steps over which ``p`` ramps up from 0; 0 uses ``ratio`` from the start.
        total_steps: optimizer steps of the run; None takes it from the trainer (via :meth:`callback`).
        seed: the masks of batch ``k`` depend only on ``(seed, k)``, so a run is reproducible.
        grad_accum: batches per optimizer step (set from the trainer by the callback).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        ratio: float = 0.2,
        replace: str | int = "random",
        warmup_ratio: float = 2 / 3,
        total_steps: int | None = None,
        seed: int = 0,
        grad_accum: int = 1,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"masked_thought.ratio must be in [0, 1], got {ratio}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"masked_thought.warmup_ratio must be in [0, 1], got {warmup_ratio}")
        if tokenizer.pad_token_id is None:
            raise ValueError("masked_thought: the tokenizer has no pad token (set tokenizer.pad_token first)")
        self.ratio = ratio
        self.warmup_ratio = warmup_ratio
        self.total_steps = total_steps
        self.seed = seed
        self.grad_accum = grad_accum
        self.batches = 0  # batches built so far; the optimizer step of batch k is k // grad_accum
        self.replace = replace
        self.mask_id, self.random_ids = _replacement(tokenizer, replace)
        self.pad = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    @property
    def step(self) -> int:
        """The optimizer step the next batch belongs to."""
        return self.batches // max(self.grad_accum, 1)

    def rate(self, step: int | None = None) -> float:
        """Masking probability at ``step`` (default: the next batch's step)."""
        step = self.step if step is None else step
        if self.warmup_ratio == 0.0:
            return self.ratio
        if self.total_steps is None:
            raise ValueError(
                "masked_thought: total_steps is unknown; pass it or use collator.callback() to the trainer"
            )
        return min(self.ratio, self.ratio * step / (self.total_steps * self.warmup_ratio + 1))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        p = self.rate()
        self.batches += 1
        ids, labels = batch["input_ids"], batch["labels"]  # (B, T) each
        eligible = labels != IGNORE
        hit = (torch.rand(ids.shape, generator=gen) < p) & eligible
        if self.random_ids is not None:
            pick = torch.randint(len(self.random_ids), ids.shape, generator=gen)
            fill = self.random_ids[pick]
        else:
            fill = torch.full_like(ids, self.mask_id)
        batch["input_ids"] = torch.where(hit, fill, ids)
        return batch

    def callback(self) -> MaskedThoughtCallback:
        """A trainer callback that keeps this collator's step counter and schedule in sync with the trainer."""
        return MaskedThoughtCallback(self)


class MaskedThoughtCallback(TrainerCallback):
    """Syncs a :class:`MaskedThoughtCollator` with the trainer: total steps, gradient accumulation, resumed step."""

    def __init__(self, collator: MaskedThoughtCollator) -> None:
        self.collator = collator

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        c = self.collator
        c.grad_accum = args.gradient_accumulation_steps
        if c.total_steps is None:
            c.total_steps = state.max_steps
        c.batches = state.global_step * c.grad_accum  # resumed runs continue the schedule where they stopped


def add_mask_token(model: Any, tokenizer: PreTrainedTokenizerBase, token: str = "<mask>") -> int:
    """Add a ``<mask>`` token whose input embedding starts as the average embedding (the MetaMath/MAmmoTH setup).

    Args:
        model: the causal LM; its embeddings are resized when the token is new.
        tokenizer: its tokenizer (save it with the model afterwards).
        token: the mask token's text.

    Returns:
        The token id (pass it, or ``token``, as ``replace`` to :class:`MaskedThoughtCollator`).
    """
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids(token)
    old = model.get_input_embeddings().weight.shape[0]
    if new_id >= old:
        model.resize_token_embeddings(new_id + 1, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[new_id] = emb[:old].mean(dim=0)
    return new_id


def _replacement(tokenizer: PreTrainedTokenizerBase, replace: str | int) -> tuple[int, torch.Tensor | None]:
    """``(mask_id, random_ids)``: a fixed replacement id, or the pool of ids to draw from uniformly."""
    if replace == "random":
        special = set(tokenizer.all_special_ids)
        pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
        return -1, pool
    if replace == "pad":
        return tokenizer.pad_token_id, None
    if isinstance(replace, int) and not isinstance(replace, bool):
        if not 0 <= replace < len(tokenizer):
            raise ValueError(f"masked_thought.replace: token id {replace} is outside the vocab ({len(tokenizer)})")
        return replace, None
    if isinstance(replace, str) and replace in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(replace), None
    raise ValueError(
        f"masked_thought.replace: {replace!r} is not 'random', 'pad', a token id or a token of the tokenizer "
        "(add a mask token with ftlab.data.masked_thought.add_mask_token first)"
    )
