"""Scorers for generated answers: pure ``(item, output) -> float`` functions, plus the summary statistics.

Generative scorers (the model writes an answer):

* ``exact``: the normalised output equals one of the normalised answers.
* ``contains``: one of the normalised answers appears in the normalised output as whole words
  ("Rome" matches "It is Rome." but not "Romeo").
* ``numeric``: the last number in the output (tolerant parse: thousands separators, unicode minus, fractions,
  trailing punctuation) equals the answer within a relative tolerance of 1e-6.
* ``rules``: every instruction rule of the item holds (see ``rules.py``; prompt-level strict accuracy as in IFEval).

Log-likelihood scorers (``choice``, ``choice_norm``, ``perplexity``) need the model's logits, not an output string;
they live in ``loglik.py`` and only their aggregation is here.

Normalisation: Unicode NFKD with accents dropped, lower case, punctuation to spaces, articles (a, an, the) removed,
whitespace collapsed.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence

from ftlab.evals.rules import check_rules

_ARTICLES = {"a", "an", "the"}
# Any punctuation mark except a decimal point between digits ("3.5").
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")
# A number: optional sign, digits with optional thousands separators, optional decimals or a fraction.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+")


def normalize(text: str) -> str:
    """Normalise text for answer comparison (accents, case, punctuation, articles, whitespace).

    Args:
        text: any string.

    Returns:
        The normalised string, words separated by single spaces.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _PUNCT.sub(" ", text.replace("_", " "))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def as_answers(answer: str | Sequence[str] | float | int) -> list[str]:
    """An item's reference answer(s) as a list of strings."""
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, int | float):
        return [str(answer)]
    return [str(a) for a in answer]


def exact_match(output: str, answer: str | Sequence[str]) -> float:
    """1.0 when the normalised output equals a normalised reference answer, else 0.0."""
    out = normalize(output)
    return float(any(out == normalize(a) for a in as_answers(answer)))


def contains(output: str, answer: str | Sequence[str]) -> float:
    """1.0 when a normalised reference answer occurs in the normalised output as whole words, else 0.0."""
    out = f" {normalize(output)} "
    return float(any(normalize(a) and f" {normalize(a)} " in out for a in as_answers(answer)))


def parse_number(text: str) -> float | None:
    """Value of a number written in ``text`` (``"1,234"``, ``"-3.5"``, ``"3/4"``, ``"−7"``), or None."""
    m = _NUMBER.search(text.replace("\u2212", "-"))
    if m is None:
        return None
    token = m.group(0).replace(",", "").replace(" ", "")
    if "/" in token:
        num, den = token.split("/")
        return float(num) / float(den) if float(den) != 0 else None
    return float(token)


def last_number(text: str) -> float | None:
    """The last number in ``text`` (tolerant parse), or None when there is none."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    return parse_number(found[-1]) if found else None


def numeric_match(output: str, answer: str | Sequence[str] | float, rel_tol: float = 1e-6) -> float:
    """1.0 when the last number in the output equals a reference number (relative tolerance ``rel_tol``)."""
    got = last_number(output)
    if got is None:
        return 0.0
    for ref in as_answers(answer):
        want = parse_number(ref)
        if want is not None and math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-9):
            return 1.0
    return 0.0


def _rules_score(item: dict, output: str) -> float:
    return float(all(check_rules(item["rules"], output).values()))


# Generative scorers: name -> (item, output) -> score in [0, 1].
GENERATIVE_SCORERS: dict[str, Callable[[dict, str], float]] = {
    "exact": lambda item, out: exact_match(out, item["answer"]),
    "contains": lambda item, out: contains(out, item["answer"]),
    "numeric": lambda item, out: numeric_match(out, item["answer"]),
    "rules": _rules_score,
}
# Forward-only scorers, computed from logits in loglik.py.
LOGLIK_SCORERS = ("choice", "choice_norm", "perplexity")
SCORERS = (*GENERATIVE_SCORERS, *LOGLIK_SCORERS)
METRICS = {
    "exact": "exact_match",
    "contains": "contains",
    "numeric": "numeric_match",
    "rules": "prompt_strict_acc",
    "choice": "acc",
    "choice_norm": "acc_norm",
    "perplexity": "perplexity",
}


def mean_stderr(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``sd(ddof=1) / sqrt(n)`` (0 for n < 2).

    Args:
        scores: per-item scores.

    Returns:
        ``(mean, stderr)``; ``(nan, nan)`` for no scores.
    """
    n = len(scores)
    if n == 0:
        return math.nan, math.nan
    mean = sum(scores) / n
    if n < 2:
        return mean, 0.0
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var / n)


def perplexity_stderr(nll_sums: Sequence[float], n_tokens: Sequence[int]) -> tuple[float, float]:
    """Corpus perplexity over items and its standard error by the delta method.

    ``L = sum(s_i) / sum(k_i)`` is the mean negative log-likelihood per token (``s_i`` summed NLL of item i,
    ``k_i`` its scored tokens) and ``ppl = exp(L)``. Treating items as the sampling unit, the ratio estimator has
    ``se(L) ~= sqrt(sum((s_i - L k_i)^2) / (n (n - 1))) / mean(k)``, and ``se(ppl) ~= ppl * se(L)``.

    Args:
        nll_sums: summed negative log-likelihood (nats) per item.
        n_tokens: number of scored tokens per item.

    Returns:
        ``(perplexity, stderr)``.
    """
    n, total = len(nll_sums), sum(n_tokens)
    if n == 0 or total == 0:
        return math.nan, math.nan
    mean_nll = sum(nll_sums) / total
    ppl = math.exp(mean_nll)
    if n < 2:
        return ppl, 0.0
    resid = sum((s - mean_nll * k) ** 2 for s, k in zip(nll_sums, n_tokens, strict=True))
    se_nll = math.sqrt(resid / (n * (n - 1))) / (total / n)
    return ppl, ppl * se_nll
