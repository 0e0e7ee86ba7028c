"""Rule checks for instruction following: each rule is a pure ``(output, **params) -> bool`` function.

An item carries ``"rules": [{"type": "lowercase"}, {"type": "max_words", "n": 40}, ...]``; the item passes when every
rule holds. The rules cover the verifiable instruction families of IFEval (Zhou et al. 2023, arXiv 2311.07911):
case, length in words / sentences / paragraphs, bullets, required / forbidden / counted words and letters, JSON,
punctuation, start / end phrases, titles, highlights, sections, placeholders, postscripts and fixed responses.
Word and sentence counts use simple regular expressions rather than IFEval's nltk tokenisers, so counts near a
limit can differ by one from IFEval's own checker; response language is not checked (it needs a language detector).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_WORD = re.compile(r"\b\w+(?:['’]\w+)*\b")
# Markdown bullets ("* ", "- ", "• ") as IFEval counts them; numbered lines are not bullets.
_BULLET = re.compile(r"^\s*[*\-•]\s+", re.MULTILINE)


def count_words(text: str) -> int:
    """Number of words (runs of letters/digits, apostrophes inside words allowed)."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Number of sentences: pieces split after ``.!?`` followed by whitespace that contain a word."""
    pieces = re.split(r"(?<=[.!?])\s+", text.strip())
    return len([p for p in pieces if _WORD.search(p)])


def _has_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE))


def _strip_fence(text: str) -> str:
    """Remove a Markdown code fence (```json ... ```) around a JSON answer."""
    text = text.strip()
    m = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    return m.group(1) if m else text


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fence(text))
    except ValueError:
        return False
    return True


def _json_keys(text: str, keys: list[str]) -> bool:
    try:
        obj = json.loads(_strip_fence(text))
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def _paragraphs(text: str, separator: str) -> list[str]:
    parts = text.split(separator) if separator != "blank" else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts]


def _n_paragraphs(text: str, n: int, separator: str = "blank") -> bool:
    parts = _paragraphs(text, separator)
    return len(parts) == n and all(parts)


def _nth_paragraph_first_word(text: str, n: int, i: int, word: str, separator: str = "blank") -> bool:
    parts = _paragraphs(text, separator)
    if len(parts) != n or not all(parts) or i > n:
        return False
    first = _WORD.findall(parts[i - 1])
    return bool(first) and first[0].lower() == word.lower()


def _compare(count: int, n: int, relation: str) -> bool:
    if relation == "at least":
        return count >= n
    if relation == "less than":
        return count < n
    if relation == "at most":
        return count <= n
    if relation == "exactly":
        return count == n
    raise ValueError(f"unknown relation {relation!r}: use 'at least', 'less than', 'at most' or 'exactly'")


# name -> check(output, **params). Parameter names are part of the suite file format.
RULES: dict[str, Callable[..., bool]] = {
    "lowercase": lambda out: out == out.lower() and any(c.isalpha() for c in out),
    "uppercase": lambda out: out == out.upper() and any(c.isalpha() for c in out),
    "min_words": lambda out, n: count_words(out) >= n,
    "max_words": lambda out, n: count_words(out) <= n,
    "min_sentences": lambda out, n: count_sentences(out) >= n,
    "max_sentences": lambda out, n: count_sentences(out) <= n,
    "exact_sentences": lambda out, n: count_sentences(out) == n,
    "exact_bullets": lambda out, n: len(_BULLET.findall(out)) == n,
    "min_bullets": lambda out, n: len(_BULLET.findall(out)) >= n,
    "include_words": lambda out, words: all(_has_word(out, w) for w in words),
    "forbid_words": lambda out, words: not any(_has_word(out, w) for w in words),
    "word_frequency": lambda out, word, n, relation="at least": _compare(_has_word(out, word), n, relation),
    "letter_frequency": lambda out, letter, n, relation="at least": _compare(
        out.lower().count(letter.lower()), n, relation
    ),
    "json": _is_json,
    "json_keys": _json_keys,
    "no_commas": lambda out: "," not in out,
    "starts_with": lambda out, text: out.strip().lower().startswith(text.lower()),
    "ends_with": lambda out, text: out.strip().lower().endswith(text.lower()),
    "title": lambda out: re.search(r"<<[^<>\n]+>>", out) is not None,
    "quotation": lambda out: len(out.strip()) > 1 and out.strip()[0] == '"' and out.strip()[-1] == '"',
    "paragraphs": _n_paragraphs,
    "nth_paragraph_first_word": _nth_paragraph_first_word,
    "min_highlights": lambda out, n: len(re.findall(r"\*[^\n*]+\*", out)) >= n,
    "sections": lambda out, n, marker="Section": len(re.findall(rf"\b{re.escape(marker)}\s+\w+", out)) >= n,
    "min_placeholders": lambda out, n: len(re.findall(r"\[[^\[\]\n]+\]", out)) >= n,
    "postscript": lambda out, marker="P.S.": re.search(rf"(?im)^\s*{re.escape(marker)}", out) is not None,
    "capital_words": lambda out, n, relation="at least": _compare(
        len([w for w in _WORD.findall(out) if w.isupper() and any(c.isalpha() for c in w)]), n, relation
    ),
    "repeat_prompt": lambda out, text: out.strip().lower().startswith(text.strip().lower()),
    "two_responses": lambda out, separator="******": (
        len(parts := [p.strip() for p in out.split(separator)]) == 2 and all(parts) and parts[0] != parts[1]
    ),
    "one_of": lambda out, options: any(o.strip() in out.strip() for o in options),
}


def validate_rule(rule: dict) -> None:
    """Raise ValueError when ``rule`` names an unknown type or lacks/misnames a parameter.

    Args:
        rule: ``{"type": name, **params}``.
    """
    import inspect

    if not isinstance(rule, dict) or "type" not in rule:
        raise ValueError(f"a rule must be an object with a 'type' field, got {rule!r}")
    name = rule["type"]
    if name not in RULES:
        raise ValueError(f"unknown rule type {name!r}; known: {', '.join(sorted(RULES))}")
    params = {k: v for k, v in rule.items() if k != "type"}
    sig = inspect.signature(RULES[name])
    try:
        sig.bind("", **params)
    except TypeError as err:
        raise ValueError(f"rule {name!r}: {err}") from None


def check_rules(rules: list[dict], output: str) -> dict[str, bool]:
    """Check every rule of an item against a model output.

    Args:
        rules: list of ``{"type": name, **params}``.
        output: the model's response.

    Returns:
        ``{"<index>:<type>": passed}`` in rule order.
    """
    return {
        f"{i}:{r['type']}": bool(RULES[r["type"]](output, **{k: v for k, v in r.items() if k != "type"}))
        for i, r in enumerate(rules)
    }
