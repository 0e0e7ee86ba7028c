"""Suites: a name, items and a scorer. Built-in suites ship with the package; user suites are read from files.

Built-in suites (``BUILTIN_SUITES``), written for ftlab:

* ``world-facts``: short-answer facts (many real capitals, science, animals, geography, history and culture,
  everyday knowledge), scored with ``contains``; ``suites/world-facts.jsonl``. Items are stored in stratified
  order (domains interleaved in proportion), so ``limit=N`` keeps a representative mix, not only capitals.
* ``world-capitals`` / ``world-knowledge``: the capitals of ``world-facts`` (89 items, the question format of the
  demo's invented capitals: "near" the demo's target) and its other domains (119 items: "mid" distance).
* ``single-digit-sums``: all 100 sums of two digits 0-9 ("What is 3 + 4? Reply with the number only."), a task the
  embedded model does well at (about 80% greedy), so losses show; ``numeric``.
* ``arithmetic``: two-digit sums and differences and one-by-two-digit products from a fixed seed, ``numeric``.
* ``instructions``: prompts with verifiable rules (case, lengths, bullets, words, JSON, ...), ``rules``;
  ``suites/instructions.jsonl``, stored with the rule types interleaved so ``limit=N`` covers many of them.
* ``general-text``: perplexity on plain English prose written for ftlab; ``suites/general-text.txt``.
* ``fictional-capitals``: the demo target task, invented countries and capitals (``ftlab.tasks``); ``split``
  picks ``train`` or ``test``.
* ``context-awareness``: 62 questions whose answer a context passage gives and common knowledge contradicts ("In
  this story, the capital of France is Nairobi."); ``contains``, the reference being the context's answer
  (``ftlab.tasks.context_awareness_items``, fixed seed).

Short-answer questions get the instruction ``ftlab.tasks.SHORT_ANSWER`` appended, so the instruct model answers
briefly and ``contains`` can find the answer.

Limits (``load_suite(ref, limit=N)``, ``limit_items``): a suite whose items carry a ``subject`` field (an MMLU file
or folder, or a JSONL whose records have one) is limited fairly across subjects, like lm-eval's per-task limit: the
N items are dealt round-robin over the subjects in the order they first appear (an MMLU folder: file names sorted),
each subject giving its items in file order, a subject that runs out dropping out of the round; the kept items stay
in their original order. ``limit=300`` on MMLU's 57 subjects keeps 6 items of each of the first 15 subjects and 5 of
each of the other 42, not all of abstract algebra, anatomy and astronomy. Any other suite keeps its first N items
(the built-in suites are stored interleaved, so their prefixes are already a mix).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ftlab.evals import ifeval, loaders
from ftlab.evals.loaders import SuiteFormatError
from ftlab.evals.scorers import GENERATIVE_SCORERS, METRICS, SCORERS
from ftlab.tasks import SHORT_ANSWER, arithmetic_items, arithmetic_task, context_awareness_items, fictional_capitals

BUILTIN_SUITES = (
    "world-facts", "world-capitals", "world-knowledge", "arithmetic", "single-digit-sums", "instructions",
    "general-text", "fictional-capitals", "context-awareness",
)  # fmt: skip
# Cap on generated tokens by scorer: short answers stop early anyway, the cap bounds a rambling answer.
MAX_NEW_TOKENS = {"exact": 24, "contains": 24, "numeric": 24, "rules": 192}
SUBJECT_KEY = "subject"  # item field that limit_items balances over
_KIND = {"choice": "choice", "choice_norm": "choice", "perplexity": "perplexity"}
# Scorers a format accepts; the first is the default.
_FORMAT_SCORERS = {
    "qa": ("contains", "exact", "numeric"),
    "rules": ("rules",),
    "ifeval": ("rules",),
    "choice": ("choice", "choice_norm"),
    "arc": ("choice", "choice_norm"),
    "mmlu": ("choice", "choice_norm"),
    "text": ("perplexity",),
}


@dataclass
class Suite:
    """A named list of items with the scorer that grades them.

    Attributes:
        name: suite name (built-in name or file stem).
        scorer: one of ``scorers.SCORERS``.
        items: dicts with at least ``id`` and ``prompt``, plus ``answer`` / ``choices`` / ``text`` / ``rules``.
        metric: name of the reported metric (``contains``, ``acc``, ``perplexity``, ...).
        higher_is_better: False only for perplexity.
        kind: ``generate``, ``choice`` or ``perplexity``: how the runner queries the model.
        max_new_tokens: generation cap for generative suites.
        source: where the items came from (``builtin`` or a path).
        chat: send prompts through the chat template (None: when the tokenizer has one; False for the ``plain`` and
            ``fewshot`` forms of ``ftlab.evals.conjugate``).
        stop_strings: a generated answer is cut at the first of these (the few-shot form's next ``Q:``).
    """

    name: str
    scorer: str
    items: list[dict]
    metric: str = ""
    higher_is_better: bool = True
    kind: str = ""
    max_new_tokens: int = 64
    source: str = "builtin"
    chat: bool | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise SuiteFormatError(f"suite {self.name!r}: unknown scorer {self.scorer!r}; known: {', '.join(SCORERS)}")
        self.metric = self.metric or METRICS[self.scorer]
        self.kind = self.kind or _KIND.get(self.scorer, "generate")
        if self.scorer == "perplexity":
            self.higher_is_better = False

    @property
    def floor(self) -> float | None:
        """The score of a model without the ability: chance for multiple choice (the mean of 1 / number of options),
        0 for generation; None for a lower-is-better metric such as perplexity, which has no floor."""
        if not self.higher_is_better:
            return None
        if self.kind == "choice":
            options = [len(it["choices"]) for it in self.items if it.get("choices")]
            return sum(1 / k for k in options) / len(options) if options else 0.0
        return 0.0


def _packaged(name: str) -> Path:
    return Path(str(resources.files("ftlab.evals").joinpath("suites", name)))


def _builtin(name: str, split: str) -> Suite:
    if name in ("world-facts", "world-capitals", "world-knowledge"):
        items = loaders.load_qa(_packaged("world-facts.jsonl"))
        if name != "world-facts":
            items = [it for it in items if (it.get("domain") == "capitals") == (name == "world-capitals")]
        for item in items:
            item["prompt"] = f"{item['prompt']} {SHORT_ANSWER}"
        return Suite(name, "contains", items, max_new_tokens=MAX_NEW_TOKENS["contains"])
    if name == "single-digit-sums":
        records = arithmetic_task(n=79, split="train") + arithmetic_task(n=21, split="test")
        items = [{"id": f"sds-{i:03d}", **r} for i, r in enumerate(records)]
        return Suite(name, "numeric", items, max_new_tokens=MAX_NEW_TOKENS["numeric"])
    if name == "arithmetic":
        return Suite(name, "numeric", arithmetic_items(), max_new_tokens=MAX_NEW_TOKENS["numeric"])
    if name == "instructions":
        return Suite(name, "rules", loaders.load_rules(_packaged("instructions.jsonl")), max_new_tokens=192)
    if name == "general-text":
        return Suite(name, "perplexity", loaders.load_text(_packaged("general-text.txt")))
    if name == "fictional-capitals":
        return Suite(name, "contains", fictional_capitals(split), max_new_tokens=MAX_NEW_TOKENS["contains"])
    if name == "context-awareness":
        return Suite(name, "contains", context_awareness_items(), max_new_tokens=MAX_NEW_TOKENS["contains"])
    raise KeyError(name)


_READERS = {
    "qa": loaders.load_qa,
    "rules": loaders.load_rules,
    "ifeval": ifeval.load_ifeval,
    "choice": loaders.load_choice,
    "arc": loaders.load_arc,
    "mmlu": loaders.load_mmlu,
    "text": loaders.load_text,
}


def _from_path(path: Path, scorer: str | None) -> Suite:
    fmt = loaders.detect_format(path)
    allowed = _FORMAT_SCORERS[fmt]
    chosen = scorer or allowed[0]
    if chosen not in allowed:
        raise SuiteFormatError(f"{path}: a {fmt} suite can be scored with {', '.join(allowed)}, not {chosen!r}")
    items = _READERS[fmt](path)
    if not items:
        raise SuiteFormatError(f"{path}: no usable items")
    name = path.name if path.is_dir() else path.stem
    return Suite(name, chosen, items, max_new_tokens=MAX_NEW_TOKENS.get(chosen, 64), source=str(path))


def limit_items(items: list[dict], limit: int | None, key: str = SUBJECT_KEY) -> list[dict]:
    """At most ``limit`` items, an equal share (give or take one) of each subject (``item[key]``) where there are any.

    Deterministic: subjects take turns in the order they first appear, each giving its next item in file order,
    until ``limit`` items are chosen (a subject with no items left is skipped, its share going to the others);
    the chosen items are returned in their original order. Items without the field form one group of their own;
    when there is only one group (no subjects at all, or a single subject) this is simply the first ``limit`` items.

    Args:
        items: the suite's items, in file order.
        limit: the number of items to keep; ``None`` keeps all.
        key: the item field naming the subject.

    Returns:
        The kept items (a new list; the item dicts are not copied).
    """
    if limit is None or limit >= len(items):
        return list(items)
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        subject = item.get(key)
        try:
            hash(subject)
        except TypeError:
            subject = repr(subject)
        groups.setdefault(subject, []).append(i)
    if len(groups) < 2:
        return items[:limit]
    taken = dict.fromkeys(groups, 0)
    left = limit
    while left:  # ends: limit < len(items), so some subject always has items left
        for subject, indices in groups.items():
            if left and taken[subject] < len(indices):
                taken[subject] += 1
                left -= 1
    keep = sorted(i for subject, indices in groups.items() for i in indices[: taken[subject]])
    return [items[i] for i in keep]


def load_suite(
    ref: str,
    scorer: str | None = None,
    limit: int | None = None,
    split: str = "test",
    lm_eval_include: str | Path | list[str | Path] | None = None,
) -> Suite:
    """Load a built-in suite by name, a user suite from a file or folder (format detected), or an lm-eval task.

    Args:
        ref: a name in ``BUILTIN_SUITES``, a path (JSONL, CSV file or folder, plain text), or ``lm-eval:TASK`` (an
            lm-evaluation-harness task, group or tag, scored through lm-eval; see ``ftlab.evals.harness``).
        scorer: override the default scorer (e.g. ``exact`` or ``numeric`` for a prompt/answer JSONL, ``choice_norm``
            for multiple choice). Built-in suites accept only their own scorer. For ``lm-eval:`` suites, the lm-eval
            metric to report (``acc_norm``, ``exact_match,flexible-extract``).
        limit: keep ``limit`` items: an equal share (give or take one) of each subject when the items have a
            ``subject`` (an MMLU folder), else the first ``limit`` (see ``limit_items``); for ``lm-eval:`` suites an
            equal share of each task.
        split: for ``fictional-capitals``, ``train`` or ``test``.
        lm_eval_include: folder(s) of custom lm-eval task YAMLs, for ``lm-eval:`` suites (ignored by others).

    Returns:
        The suite.

    Raises:
        SuiteFormatError: a file that cannot be read, naming the file, line and field.
        FileNotFoundError: ``ref`` is neither a built-in name nor an existing path.
    """
    if limit is not None and limit < 1:
        raise SuiteFormatError(f"limit must be >= 1, got {limit}")
    if ref.startswith("lm-eval:"):
        from ftlab.evals.harness import load_harness_suite

        return load_harness_suite(ref, scorer=scorer, limit=limit, include=lm_eval_include)
    if ref in BUILTIN_SUITES:
        if ref == "fictional-capitals" and split not in ("train", "test"):
            raise SuiteFormatError(f"suite {ref!r}: split {split!r} is neither 'train' nor 'test'")
        suite = _builtin(ref, split)
        if scorer is not None and scorer != suite.scorer:
            if not (suite.kind == "generate" and scorer in GENERATIVE_SCORERS and suite.scorer != "rules"):
                raise SuiteFormatError(f"built-in suite {ref!r} is scored with {suite.scorer!r}, not {scorer!r}")
            suite = Suite(suite.name, scorer, suite.items, max_new_tokens=suite.max_new_tokens)
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            known = ", ".join(BUILTIN_SUITES)
            raise FileNotFoundError(f"suite {ref!r} is neither a built-in suite ({known}) nor an existing path")
        suite = _from_path(path, scorer)
    if limit is not None:
        suite.items = limit_items(suite.items, limit)
    return suite
