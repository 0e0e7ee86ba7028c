"""Run a suite on a model: ``evaluate(model, tokenizer, suite) -> SuiteResult`` with per-item rows.

The suite's ``kind`` decides how the model is queried: ``generate`` (batched greedy generation, then a generative
scorer on each output), ``choice`` (log-likelihood of each option), ``perplexity`` (NLL of each text) or ``lm-eval``
(an lm-evaluation-harness task scored by lm-eval itself, ``harness.run_harness``). The model
is a Hugging Face causal LM or any logits callable with ``.device`` (see ``generation.py``).

Summary statistics: accuracy-like metrics report the mean item score and its standard error
``sd(ddof=1) / sqrt(n)``; perplexity reports the corpus perplexity ``exp(sum NLL / sum tokens)`` with a
delta-method standard error (``scorers.perplexity_stderr``), while each item row carries that item's own perplexity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ftlab.evals.conjugate import cut_output
from ftlab.evals.generation import eval_mode, generate
from ftlab.evals.loglik import choice_logliks, pick_choice, text_nll
from ftlab.evals.scorers import GENERATIVE_SCORERS, mean_stderr, perplexity_stderr
from ftlab.evals.suites import Suite


@dataclass
class ItemResult:
    """One scored item: what the model was asked, what it produced, the reference and the score."""

    item_id: str
    prompt: str
    output: str
    reference: str
    score: float


@dataclass
class SuiteResult:
    """A suite's summary score with its per-item rows."""

    suite: str
    metric: str
    score: float
    n: int
    stderr: float
    higher_is_better: bool
    items: list[ItemResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The summary ``{"metric", "score", "n", "stderr"}`` (JSON-safe: non-finite numbers become None)."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"metric": self.metric, "score": finite(self.score), "n": self.n, "stderr": finite(self.stderr)}

    def rows(self) -> list[dict]:
        """Per-item rows as plain dicts (for the store)."""
        return [asdict(r) for r in self.items]


def _reference(item: dict) -> str:
    if "rules" in item:
        return "; ".join(str(r) for r in item["rules"])
    answer = item.get("answer")
    return " | ".join(map(str, answer)) if isinstance(answer, list) else str(answer)


def _reference_choice(item: dict) -> str:
    return str(item["choices"][item["answer"]])


def _run_generate(model, tokenizer, suite: Suite, batch_size: int, max_new: int, progress: bool) -> list[ItemResult]:
    prompts = [item["prompt"] for item in suite.items]
    outputs = generate(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new, progress=progress, chat=suite.chat
    )
    if suite.stop_strings:  # a conjugate frame (ftlab.evals.conjugate): the answer ends where the next shot starts
        outputs = [cut_output(out, suite.stop_strings) for out in outputs]
    score = GENERATIVE_SCORERS[suite.scorer]
    return [
        ItemResult(str(item["id"]), item["prompt"], out, _reference(item), score(item, out))
        for item, out in zip(suite.items, outputs, strict=True)
    ]


def _run_choice(model, tokenizer, suite: Suite, batch_size: int, progress: bool) -> list[ItemResult]:
    logliks = choice_logliks(model, tokenizer, suite.items, batch_size=batch_size, progress=progress)
    rows = []
    for item, ll in zip(suite.items, logliks, strict=True):
        picked = pick_choice(ll, normalize=suite.scorer == "choice_norm")
        hit = float(picked == item["answer"])
        rows.append(ItemResult(str(item["id"]), item["prompt"], item["choices"][picked], _reference_choice(item), hit))
    return rows


def evaluate(
    model,
    tokenizer,
    suite: Suite,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    split: bool = False,
) -> SuiteResult | None:
    """Score a model on a suite.

    Args:
        model: a Hugging Face causal LM, or any callable ``model(input_ids=..., attention_mask=...)`` returning an
            object with ``.logits`` and having ``.device`` (greedy loop without KV cache for generation). A model
            in training mode is evaluated in eval mode (no dropout) and switched back afterwards.
        tokenizer: its tokenizer (chat template used for generation when it has one).
        suite: the suite to run.
        batch_size: prompts (or sequences) per forward batch; results do not depend on it.
        max_new_tokens: generation cap (default: the suite's).
        progress: progress bar on stderr.
        split: in a process group of several processes (``torch.distributed``), every process calls this together
            and scores a contiguous share of the items; the main process gathers the rows in item order and
            returns the result, the others return None. An lm-eval suite is scored by the main process alone.
            The result equals one process's up to batching.

    Returns:
        The suite result with one row per item (None on a non-main process with ``split``).
    """
    if not suite.items:
        raise ValueError(f"suite {suite.name!r} has no items")
    if split:
        from ftlab import distributed

        split = distributed.world_size() > 1
        if split and suite.kind == "lm-eval" and not distributed.is_main():
            return None
        split = split and suite.kind != "lm-eval"
        progress = progress and distributed.is_main()
    with eval_mode(model):
        if split:
            got = _run_split(model, tokenizer, suite, batch_size, max_new_tokens, progress)
            if got is None:
                return None
            rows, score, stderr = got
        else:
            rows, score, stderr = _run(model, tokenizer, suite, batch_size, max_new_tokens, progress)
    return SuiteResult(suite.name, suite.metric, score, len(rows), stderr, suite.higher_is_better, rows)


def _run(model, tokenizer, suite: Suite, batch_size: int, max_new_tokens: int | None, progress: bool) -> tuple:
    if suite.kind == "lm-eval":  # scored by lm-evaluation-harness (``harness.py``)
        from ftlab.evals.harness import run_harness

        return run_harness(model, tokenizer, suite, batch_size, max_new_tokens)
    rows, nll = _item_rows(model, tokenizer, suite, batch_size, max_new_tokens, progress)
    return (rows, *_score(rows, nll))


def _item_rows(model, tokenizer, suite: Suite, batch_size: int, max_new_tokens: int | None, progress: bool) -> tuple:
    """``(rows, nll)``: one row per item, and for a perplexity suite each item's ``(sum NLL, tokens)`` (else None)."""
    if suite.kind == "generate":
        max_new = max_new_tokens or suite.max_new_tokens
        return _run_generate(model, tokenizer, suite, batch_size, max_new, progress), None
    if suite.kind == "choice":
        return _run_choice(model, tokenizer, suite, batch_size, progress), None
    if suite.kind == "perplexity":
        texts = [item["text"] for item in suite.items]
        nll = text_nll(model, tokenizer, texts, batch_size=max(1, batch_size // 2), progress=progress)
        rows = [
            ItemResult(str(item["id"]), item["text"][:200], "", "", math.exp(s / k) if k else math.nan)
            for item, (s, k) in zip(suite.items, nll, strict=True)
        ]
        return rows, list(nll)
    raise ValueError(f"suite {suite.name!r}: unknown kind {suite.kind!r}")


def _score(rows: list[ItemResult], nll: list | None) -> tuple[float, float]:
    """``(score, stderr)``: the corpus perplexity when ``nll`` is given, else the mean item score."""
    if nll is not None:
        return perplexity_stderr([s for s, _ in nll], [k for _, k in nll])
    return mean_stderr([r.score for r in rows])


def _run_split(model, tokenizer, suite: Suite, batch_size: int, max_new_tokens: int | None, progress: bool):
    """This process's contiguous share of the items, gathered on the main process (None elsewhere)."""
    import dataclasses

    from ftlab import distributed

    start, stop = distributed.shard_bounds(len(suite.items), distributed.rank(), distributed.world_size())
    part = dataclasses.replace(suite, items=suite.items[start:stop])
    empty = ([], [] if suite.kind == "perplexity" else None)
    mine = _item_rows(model, tokenizer, part, batch_size, max_new_tokens, progress) if part.items else empty
    shares = distributed.gather_to_main(mine)
    if shares is None:
        return None
    rows = [row for share, _ in shares for row in share]
    nll = None if suite.kind != "perplexity" else [x for _, share in shares for x in share]
    return (rows, *_score(rows, nll))


def evaluate_many(model, tokenizer, suites: list[Suite], **kw) -> dict[str, SuiteResult]:
    """Run several suites on one model.

    Args:
        model: as for ``evaluate``.
        tokenizer: its tokenizer.
        suites: suites to run (names must be unique).
        **kw: passed to ``evaluate`` (``batch_size``, ``max_new_tokens``, ``progress``).

    Returns:
        ``{suite name: result}`` in the order given.
    """
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise ValueError(f"suite names must be unique, got {names}")
    return {s.name: evaluate(model, tokenizer, s, **kw) for s in suites}
