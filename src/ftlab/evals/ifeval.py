"""Read IFEval prompt files (``{"key", "prompt", "instruction_id_list", "kwargs"}``) as ``rules`` suites.

Each IFEval instruction id is mapped onto one of our rules (``rules.py``) with the same threshold semantics
("less than N" words becomes ``max_words`` N - 1). ``language:response_language`` needs a language detector and is
not mapped: prompts that use it are skipped, and the count is written to stderr. Scores follow IFEval's
prompt-level strict accuracy; our word and sentence counters are regexes, not nltk, so they can differ by one near a
limit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from ftlab.evals.loaders import SuiteFormatError, read_jsonl


def _count(less_than: str, more: str) -> Callable[[dict, str, str], dict]:
    # IFEval relations are "less than" (strict) and "at least".
    def convert(kw: dict, n_key: str, rel_key: str) -> dict:
        n, rel = int(kw[n_key]), kw.get(rel_key, "at least")
        return {"type": less_than, "n": n - 1} if rel == "less than" else {"type": more, "n": n}

    return convert


_WORDS, _SENTENCES = _count("max_words", "min_words"), _count("max_sentences", "min_sentences")

# IFEval instruction id -> kwargs -> our rule.
IFEVAL_RULES: dict[str, Callable[[dict], dict]] = {
    "punctuation:no_comma": lambda kw: {"type": "no_commas"},
    "change_case:english_lowercase": lambda kw: {"type": "lowercase"},
    "change_case:english_capital": lambda kw: {"type": "uppercase"},
    "change_case:capital_word_frequency": lambda kw: {
        "type": "capital_words",
        "n": int(kw["capital_frequency"]),
        "relation": kw["capital_relation"],
    },
    "length_constraints:number_words": lambda kw: _WORDS(kw, "num_words", "relation"),
    "length_constraints:number_sentences": lambda kw: _SENTENCES(kw, "num_sentences", "relation"),
    "length_constraints:number_paragraphs": lambda kw: {
        "type": "paragraphs",
        "n": int(kw["num_paragraphs"]),
        "separator": "***",
    },
    "length_constraints:nth_paragraph_first_word": lambda kw: {
        "type": "nth_paragraph_first_word",
        "n": int(kw["num_paragraphs"]),
        "i": int(kw["nth_paragraph"]),
        "word": kw["first_word"],
    },
    "detectable_format:json_format": lambda kw: {"type": "json"},
    "detectable_format:number_bullet_lists": lambda kw: {"type": "exact_bullets", "n": int(kw["num_bullets"])},
    "detectable_format:title": lambda kw: {"type": "title"},
    "detectable_format:number_highlighted_sections": lambda kw: {
        "type": "min_highlights",
        "n": int(kw["num_highlights"]),
    },
    "detectable_format:multiple_sections": lambda kw: {
        "type": "sections",
        "n": int(kw["num_sections"]),
        "marker": kw["section_spliter"].strip(),
    },
    "detectable_format:constrained_response": lambda kw: {
        "type": "one_of",
        "options": ["My answer is yes.", "My answer is no.", "My answer is maybe."],
    },
    "detectable_content:number_placeholders": lambda kw: {
        "type": "min_placeholders",
        "n": int(kw["num_placeholders"]),
    },
    "detectable_content:postscript": lambda kw: {"type": "postscript", "marker": kw["postscript_marker"]},
    "keywords:existence": lambda kw: {"type": "include_words", "words": list(kw["keywords"])},
    "keywords:forbidden_words": lambda kw: {"type": "forbid_words", "words": list(kw["forbidden_words"])},
    "keywords:frequency": lambda kw: {
        "type": "word_frequency",
        "word": kw["keyword"],
        "n": int(kw["frequency"]),
        "relation": kw["relation"],
    },
    "keywords:letter_frequency": lambda kw: {
        "type": "letter_frequency",
        "letter": kw["letter"],
        "n": int(kw["let_frequency"]),
        "relation": kw["let_relation"],
    },
    "startend:end_checker": lambda kw: {"type": "ends_with", "text": kw["end_phrase"]},
    "startend:quotation": lambda kw: {"type": "quotation"},
    "combination:repeat_prompt": lambda kw: {"type": "repeat_prompt", "text": kw["prompt_to_repeat"]},
    "combination:two_responses": lambda kw: {"type": "two_responses"},
}


def load_ifeval(path: Path) -> list[dict]:
    """Items of an IFEval JSONL file as ``rules`` items; prompts with an unmapped instruction are skipped."""
    items, skipped = [], 0
    for n, rec in read_jsonl(path):
        ids, kwargs = rec.get("instruction_id_list"), rec.get("kwargs")
        if not isinstance(rec.get("prompt"), str):
            raise SuiteFormatError(f"{path}:{n}: field 'prompt' must be a string")
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise SuiteFormatError(
                f"{path}:{n}: fields 'instruction_id_list' and 'kwargs' must be lists of the same length"
            )
        if any(i not in IFEVAL_RULES for i in ids):
            skipped += 1
            continue
        try:
            # IFEval files list every kwarg of an instruction family, unused ones as null.
            rules = [
                IFEVAL_RULES[i]({k: v for k, v in (kw or {}).items() if v is not None})
                for i, kw in zip(ids, kwargs, strict=True)
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise SuiteFormatError(f"{path}:{n}: field 'kwargs': bad or missing value {err}") from None
        items.append({"id": str(rec.get("key", n)), "prompt": rec["prompt"], "rules": rules})
    if skipped:
        note = f"{path}: skipped {skipped} prompts with instructions ftlab cannot check (response language)"
        print(note, file=sys.stderr)
    return items
