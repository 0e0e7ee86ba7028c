"""EFT up-scaling: decode-time combination of a large base with a small fine-tune's delta (Mitchell et al., ICLR 2024).

Paper: arXiv 2310.12962; docs/methods.md, "EFT". At every position the combined logits are
    large_base + Σ_i w_i (small_tuned_i − small_base),
raw logits as in the reference implementation (the per-model log-softmax constants cancel in the final softmax);
temperature / top-p, when wanted, go on the combined logits. Up-scaling is one small fine-tune with w = 1;
down-scaling is the same object with a small base and a large fine-tune pair.

Prompt formats. By default (``formats=None``) every model sees the caller's input ids unchanged. The reference
implementation instead gives each model its own prompt: the chat template to the fine-tuned model, a plain text
prompt to the base models, with the generated continuation shared. ``formats`` does that, one entry per model
(large base, small tuned..., small base): ``"input"`` (the caller's ids), ``"chat"`` (one user turn in the chat
template of ``tokenizer``, with the generation prompt), ``"plain"`` (the prompt text with the tokenizer's default
special tokens) or a template string containing ``{prompt}``; e.g. ``["plain", "chat", "plain"]``. The prompt is
read back from the caller's ids, which must then be the chat template's rendering of one user turn (what
``ftlab.evals.generation`` feeds a model whose tokenizer has a template) followed by the continuation; a row that
does not have that shape (raw text, as log-likelihood scoring sends) goes to every model unchanged. The combined
logits are aligned on the continuation: the output at the caller's last prompt token and after it combines each
model's logits at the matching position of its own sequence; positions inside a reformatted prompt have no common
meaning and are NaN.

Differences from the reference (ZHZisZZ/emulated-disalignment): no KV caches, every call recomputes the sequence.
Logits are cut to the shared vocabulary (the smallest logit width), which covers embedding tables padded to
different sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput

FORMATS = ("input", "chat", "plain")  # besides these, any template string containing "{prompt}"


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
        formats: prompt format per model (large base, small tuned..., small base), each ``"input"``, ``"chat"``,
            ``"plain"`` or a template with ``{prompt}``; None (default): every model sees the caller's ids.
        tokenizer: reads prompts back from the caller's ids and formats them (its chat template is ``"chat"``);
            default: the first small fine-tune's tokenizer from ``tokenizers``. Needed only with ``formats``.
    """

    def __init__(
        self,
        large_base: PreTrainedModel,
        small_tuned: PreTrainedModel | Sequence[PreTrainedModel],
        small_base: PreTrainedModel,
        weight: float | Sequence[float] = 1.0,
        tokenizers: Sequence[PreTrainedTokenizerBase] | None = None,
        formats: Sequence[str] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
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
        self.formats: list[str] | None = None
        self._prompts: _ChatPrompts | None = None
        if formats is not None and any(f != "input" for f in formats):
            formats = _check_formats(formats, len(models))
            if tokenizer is None and tokenizers is not None:
                tokenizer = tokenizers[1]
            if tokenizer is None:
                raise ValueError("formats= needs tokenizer= (or tokenizers=) to read and format the prompts")
            self.formats, self._prompts = formats, _ChatPrompts(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.large_base.device

    @property
    def models(self) -> list[PreTrainedModel]:
        """All models in ``formats`` order: large base, small tuned..., small base."""
        return [self.large_base, *self.small_tuned, self.small_base]

    def _combine(self, large: torch.Tensor, tuned: list[torch.Tensor], small_base: torch.Tensor) -> torch.Tensor:
        V = min(t.shape[-1] for t in (large, small_base, *tuned))
        combined = large[..., :V].clone()
        for w, t in zip(self.weights, tuned, strict=True):
            combined += w * (t[..., :V] - small_base[..., :V])
        return combined

    def _logits(self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any):
        ids = ids.to(model.device)
        mask = mask.to(model.device) if mask is not None else None
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        return out.to(self.device, torch.float32)  # B, T, V_model

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.formats is not None:
            return CausalLMOutput(logits=self._formatted(input_ids, attention_mask, **kwargs))
        large, *tuned, small_base = [self._logits(m, input_ids, attention_mask, **kwargs) for m in self.models]
        return CausalLMOutput(logits=self._combine(large, tuned, small_base))

    def _formatted(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """Each model on its own prompt format plus the shared continuation; logits aligned on the continuation."""
        assert self.formats is not None and self._prompts is not None
        B, T = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = [mask[r].nonzero().view(-1).cpu() for r in range(B)]  # real tokens of row r, in order
        rows = [input_ids[r].cpu()[positions[r]].tolist() for r in range(B)]
        # per model: the token lists it runs, and per row the length of the prompt it replaces / is given
        caller_len, seqs = [], [[] for _ in self.formats]
        for row in rows:
            split = self._prompts.split(row)
            if split is None:  # not a chat-templated prompt: every model sees the row as it is
                caller_len.append(0)
                for s in seqs:
                    s.append((row, 0))
                continue
            prompt_ids, text, rest = split
            caller_len.append(len(prompt_ids))
            for fmt, s in zip(self.formats, seqs, strict=True):
                own = prompt_ids if fmt in ("input", "chat") else self._prompts.encode(fmt, text)
                s.append((own + rest, len(own)))
        outs = []
        for model, s in zip(self.models, seqs, strict=True):
            width = max(len(ids) for ids, _ in s)
            ids = torch.zeros((B, width), dtype=torch.long)
            pad = torch.zeros((B, width), dtype=torch.long)
            for r, (x, _) in enumerate(s):  # right padding: row r's tokens at 0..len-1
                ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
                pad[r, : len(x)] = 1
            outs.append(self._logits(model, ids, pad, **kwargs))
        V = min(o.shape[-1] for o in outs)
        out = torch.full((B, T, V), float("nan"), device=self.device)
        for r in range(B):
            n, lc = len(rows[r]), caller_len[r]
            start = max(lc - 1, 0)  # the last prompt token predicts the first continuation token
            take = []
            for o, s in zip(outs, seqs, strict=True):
                own_len = s[r][1]
                take.append(o[r, start - lc + own_len : n - lc + own_len, :V])  # (n - start, V)
            large, *tuned, small_base = take
            out[r, positions[r][start:n].to(self.device)] = self._combine(large, tuned, small_base)
        return out


def _check_formats(formats: Sequence[str], n_models: int) -> list[str]:
    formats = list(formats)
    if len(formats) != n_models:
        raise ValueError(f"formats needs one entry per model ({n_models}: large base, small tuned..., small base)")
    for f in formats:
        if f not in FORMATS and "{prompt}" not in f:
            raise ValueError(f"prompt format {f!r} is neither one of {', '.join(FORMATS)} nor a {{prompt}} template")
    return formats


class _ChatPrompts:
    """Reads a one-user-turn chat prompt back from token ids, and writes a prompt text in another format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("formats= needs a tokenizer with a chat template (the caller's prompts are read with it)")
        self.tokenizer = tokenizer
        a, b = self.chat("0"), self.chat("1")  # two renders: what they share is the template around the content
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        m = 0
        while m < min(len(a), len(b)) - n and a[-1 - m] == b[-1 - m]:
            m += 1
        self.opening, self.closing = a[:n], a[len(a) - m :]

    def chat(self, text: str) -> list[int]:
        """Token ids of ``text`` as one user turn with the generation prompt (as the evaluation loop encodes it)."""
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def encode(self, fmt: str, text: str) -> list[int]:
        """Token ids of prompt ``text`` in format ``fmt`` (``chat``, ``plain`` or a ``{prompt}`` template)."""
        if fmt == "chat":
            return self.chat(text)
        return self.tokenizer(text if fmt == "plain" else fmt.replace("{prompt}", text))["input_ids"]

    def split(self, row: list[int]) -> tuple[list[int], str, list[int]] | None:
        """``(prompt ids, prompt text, continuation ids)`` of a chat-templated row, or None for any other row."""
        n, m = len(self.opening), len(self.closing)
        if row[:n] != self.opening or m == 0:
            return None
        for end in range(n, len(row) - m + 1):  # the first closing after the opening ends the prompt
            if row[end : end + m] == self.closing:
                text = self.tokenizer.decode(row[n:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                return row[: end + m], text, row[end + m :]
        return None
