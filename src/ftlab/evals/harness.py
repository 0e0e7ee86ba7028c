"""lm-evaluation-harness tasks as suites: ``lm-eval:TASK`` scored on the in-memory model through lm-eval's Python API.

``load_suite("lm-eval:NAME")`` (``ftlab eval --suite lm-eval:NAME``, or a target or retained suite of ``ftlab run``)
names an lm-eval task, group or tag. Custom task YAMLs are found in the folders given as ``include``
(``--lm-eval-include DIR``, ``eval.lm_eval_include``), searched before lm-eval's own tasks; a name defined there is
resolved from that folder alone when it can be, which skips indexing lm-eval's ~15,000 built-in task files.

* **Name.** The suite is stored under its full reference, ``lm-eval:NAME``, so it never collides with a file suite
  scored by ftlab's own scorers on the same data (``ARC-Easy-Test`` and ``lm-eval:arc_easy``).
* **Items.** One item per document of each leaf task's evaluation split: ``id`` is lm-eval's ``doc_id`` (the
  document's index in that split), prefixed ``TASK/`` in a group or tag of several tasks. ``limit`` keeps ftlab's
  meaning: N items in all, an equal share of each leaf task (``suites.limit_items`` over the tasks); the kept
  documents are handed to lm-eval as ``samples``.
* **Metric.** The task's first metric and first filter (a group's first aggregate metric), e.g. ``acc``; a
  ``scorer`` names another one (``acc_norm``, ``exact_match,flexible-extract``). Only metrics that lm-eval averages
  over documents are accepted, so every item has its own score and paired tests work.
* **Scoring.** ``run_harness`` wraps the model in lm-eval's ``HFLM`` and calls ``simple_evaluate`` with
  ``log_samples=True``. Each item row is one logged sample: the context the model saw (few-shot examples
  included), its output (the option it ranks first under the metric, or its generation after the metric's filter),
  the reference (the gold option or target) and the sample's metric value. The suite score and its standard error
  are lm-eval's reported values for the task or group; when lm-eval reports none for the name (a tag, a group
  without ``aggregate_metric_list``, or a group some of whose tasks a small limit left without items) they are the
  mean of the item scores and its standard error.
* **Floor.** Chance for multiple choice (the mean of 1 / number of options), 0 for other tasks, none for a
  lower-is-better metric.

lm-eval is optional (``pip install 'ftlab[harness]'``) and imported only when an ``lm-eval:`` suite is loaded. lm-eval
reseeds Python's, NumPy's and torch's global generators; their states are restored afterwards, so an evaluation
does not change the randomness of the training that follows it. Limits: prompts are not wrapped in a chat template
(lm-eval's default); tasks of type ``loglikelihood_rolling`` (perplexity; use a text file suite) and corpus-level
metrics (BLEU, F1, ...) are refused; a decode-time composite (``tuco``) cannot be scored, as ``HFLM`` needs a Hugging
Face model.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ftlab.evals.loaders import SuiteFormatError
from ftlab.evals.suites import Suite, limit_items

PREFIX = "lm-eval:"
KIND = "lm-eval"  # Suite.kind the runner hands to ``run_harness``
INSTALL = "pip install 'ftlab[harness]'"
TASK_KEY = "task"  # item field naming the leaf task (what ``limit`` balances over)
_OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood")
# lm-eval's notes about being handed a ready model: expected here, so not shown.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


@dataclass
class HarnessSuite(Suite):
    """A suite scored by lm-evaluation-harness (``kind`` ``lm-eval``).

    Attributes (beyond ``Suite``'s):
        task: the lm-eval task, group or tag name.
        include: folders of custom task YAMLs.
        defaults: whether ``task`` needs lm-eval's built-in tasks (False: resolved from ``include`` alone).
        metric_key: lm-eval's result key of the metric, ``metric,filter``.
        chance: the floor (see the module docstring).
    """

    task: str = ""
    include: tuple[str, ...] = ()
    defaults: bool = True
    metric_key: str = ""
    chance: float | None = 0.0

    @property
    def floor(self) -> float | None:
        """Chance for multiple choice, 0 for other tasks, None for a lower-is-better metric."""
        return self.chance if self.higher_is_better else None


def is_harness_ref(ref: str) -> bool:
    """Whether a suite reference names an lm-eval task (``lm-eval:NAME``)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def _lm_eval(ref: str) -> Any:
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise SuiteFormatError(f"suite {ref!r} needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def include_paths(include: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
    """The include folders as resolved paths (each must be an existing folder)."""
    if include is None or include == "":
        return ()
    items = [include] if isinstance(include, str | Path) else list(include)
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise SuiteFormatError(f"lm-eval include folder {str(item)!r} does not exist or is not a folder")
        paths.append(str(path.resolve()))
    return tuple(paths)


@lru_cache(maxsize=8)
def _manager(include: tuple[str, ...], defaults: bool) -> Any:
    """An lm-eval ``TaskManager`` over ``include`` (and lm-eval's own tasks when ``defaults``); indexing the built-in
    tasks takes seconds, so each one is built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _load(name: str, include: tuple[str, ...], defaults: bool) -> dict:
    with _quiet():
        return _manager(include, defaults).load([name])


def _resolve(ref: str, name: str, include: tuple[str, ...]) -> tuple[bool, dict]:
    """``(defaults, loaded)``: the task loaded from the include folders alone when it is defined there and loads
    without lm-eval's built-in tasks, else from the full index."""
    if include and name in _manager(include, False).all_tasks:
        try:
            return False, _load(name, include, False)
        except Exception:  # noqa: BLE001 - it may refer to built-in tasks or files: try the full index below
            pass
    manager = _manager(include, True)
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = "" if include else "; pass --lm-eval-include DIR (eval.lm_eval_include) for a folder of task YAMLs"
        raise SuiteFormatError(f"suite {ref!r}: no lm-eval task, group or tag named {name!r}{hint}{where}")
    try:
        return True, _load(name, include, True)
    except Exception as err:  # noqa: BLE001 - a task's YAML or data is the user's input: report it in one line
        raise SuiteFormatError(f"suite {ref!r}: lm-eval could not load {name!r}: {type(err).__name__}: {err}") from err


def _filters(task: Any) -> list[str]:
    return [f.name for f in getattr(task, "_filters", [])] or ["none"]


def _main_metric(ref: str, name: str, loaded: dict, scorer: str | None) -> tuple[str, str]:
    """``(metric, filter)``: the scorer's choice, else the group's first aggregate metric or the first task's first
    metric, with the first filter."""
    tasks = list(loaded["tasks"].values())
    group = loaded["groups"].get(name)
    if scorer:
        metric, _, filt = scorer.partition(",")
    elif group is not None and group.has_aggregation:
        agg = group.aggregate_metric_list[0]
        flist = [agg.filter_list] if isinstance(agg.filter_list, str) else agg.filter_list
        metric, filt = agg.metric, (flist or [""])[0]
    else:
        metric, filt = next(iter(tasks[0].aggregation()), ""), ""
    filt = filt or _filters(tasks[0])[0]
    for task in tasks:
        known = task.aggregation()
        if metric not in known:
            raise SuiteFormatError(
                f"suite {ref!r}: lm-eval task {task.task_name!r} has no metric {metric!r}; "
                f"it has {', '.join(known) or 'none'}"
            )
        if getattr(known[metric], "__name__", "") != "mean":
            means = [m for m, fn in known.items() if getattr(fn, "__name__", "") == "mean"]
            raise SuiteFormatError(
                f"suite {ref!r}: metric {metric!r} of lm-eval task {task.task_name!r} is aggregated over the whole "
                f"set, not a mean of per-item scores; pick one of {', '.join(means) or 'none'} as the scorer"
            )
        if filt not in _filters(task):
            raise SuiteFormatError(
                f"suite {ref!r}: lm-eval task {task.task_name!r} has no filter {filt!r}; "
                f"it has {', '.join(_filters(task))}"
            )
    return metric, filt


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def load_harness_suite(
    ref: str,
    scorer: str | None = None,
    limit: int | None = None,
    include: str | Path | Sequence[str | Path] | None = None,
) -> HarnessSuite:
    """The suite of an lm-eval task, group or tag (see the module docstring).

    Args:
        ref: ``lm-eval:NAME``.
        scorer: the lm-eval metric to report, ``metric`` or ``metric,filter`` (default: the task's first).
        limit: keep N items in all, an equal share of each leaf task.
        include: folder(s) of custom task YAMLs.

    Returns:
        The suite; its items carry ``task`` and ``doc_id`` (and ``choices``/``answer`` for multiple choice).

    Raises:
        SuiteFormatError: lm-eval missing, an unknown name, a task that cannot be loaded, an unsupported output type
            or metric.
    """
    lm_eval = _lm_eval(ref)
    name = ref[len(PREFIX) :].strip()
    if not name:
        raise SuiteFormatError(f"suite {ref!r}: name an lm-eval task, group or tag after {PREFIX!r}")
    inc = include_paths(include)
    defaults, loaded = _resolve(ref, name, inc)
    tasks = loaded["tasks"]
    if not tasks:
        raise SuiteFormatError(f"suite {ref!r}: lm-eval {name!r} holds no tasks")
    for task_name, task in tasks.items():
        if task.OUTPUT_TYPE not in _OUTPUT_TYPES:
            raise SuiteFormatError(
                f"suite {ref!r}: lm-eval task {task_name!r} is of type {task.OUTPUT_TYPE!r}; ftlab scores "
                f"{', '.join(_OUTPUT_TYPES)} tasks (for perplexity use a text file suite)"
            )
    metric, filt = _main_metric(ref, name, loaded, scorer)
    first = next(iter(tasks.values()))
    higher = bool(first.higher_is_better().get(metric, True))
    several = len(tasks) > 1
    refs = [
        {"id": f"{t}/{i}" if several else str(i), TASK_KEY: t, "doc_id": i}
        for t, task in tasks.items()
        for i in range(len(task.eval_docs))
    ]
    if not refs:
        raise SuiteFormatError(f"suite {ref!r}: lm-eval {name!r} has no documents to evaluate")
    items = limit_items(refs, limit, key=TASK_KEY)
    options = []
    for item in items:
        task = tasks[item[TASK_KEY]]
        doc = task.eval_docs[item["doc_id"]]
        item["prompt"] = _text(task.doc_to_text(doc))
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            item["choices"] = [_text(c) for c in task.doc_to_choice(doc)]
            options.append(len(item["choices"]))
            if isinstance(target, int) and 0 <= target < len(item["choices"]):
                item["answer"] = target
    chance = sum(1 / k for k in options) / len(options) if options and len(options) == len(items) else 0.0
    # ``scorer`` is informational for this kind (the runner hands the suite to lm-eval); it must be a known one
    scorer_name = "choice_norm" if metric == "acc_norm" else "choice"
    if first.OUTPUT_TYPE == "generate_until":
        scorer_name = "exact"
    return HarnessSuite(
        name=ref,
        scorer=scorer_name,
        items=items,
        metric=metric if filt == "none" else f"{metric},{filt}",
        higher_is_better=higher,
        kind=KIND,
        source=f"lm-eval {lm_eval.__version__}",
        task=name,
        include=inc,
        defaults=defaults,
        metric_key=f"{metric},{filt}",
        chance=chance,
    )


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.getMessage().startswith(w) for w in _EXPECTED_WARNINGS)


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide lm-eval's expected warnings about being handed a ready model; keep every other one."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropExpected()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def _generators_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states (lm-eval reseeds them)."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _choice_output(sample: dict, item: dict, metric: str) -> str:
    choices = item.get("choices") or [c for _, c in sample["arguments"]]
    lls = [float(r[0]) for r in sample["filtered_resps"][: len(choices)]]
    if metric == "acc_norm":
        lls = [ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]
    elif metric == "acc_bytes":
        lls = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices, strict=True)]
    return choices[max(range(len(lls)), key=lls.__getitem__)]


def _reference(item: dict, target: Any) -> str:
    choices = item.get("choices")
    if choices and isinstance(target, int) and 0 <= target < len(choices):
        return choices[target]
    if choices and isinstance(target, list) and all(isinstance(t, int) for t in target):
        return " | ".join(choices[t] for t in target if 0 <= t < len(choices))
    return " | ".join(map(str, target)) if isinstance(target, list) else _text(target)


def _row(item: dict, sample: dict, metric: str, output_type: str) -> Any:
    from ftlab.evals.runner import ItemResult

    args = sample.get("arguments") or []
    prompt = _text(args[0][0]) if args and isinstance(args[0], list | tuple) else item["prompt"]
    resps = sample.get("filtered_resps") or []
    if output_type == "multiple_choice":
        output = _choice_output(sample, item, metric)
    elif output_type == "generate_until":
        output = _text(resps[0] if isinstance(resps, list) and resps else resps)
    else:  # loglikelihood: (log-likelihood, whether the continuation is the greedy one)
        ll, greedy = resps[0] if resps else (math.nan, False)
        output = f"loglik {float(ll):.4f}, {'greedy' if greedy else 'not greedy'}"
    value = sample[metric]
    return ItemResult(str(item["id"]), prompt, output, _reference(item, sample.get("target")), float(value))


def run_harness(
    model: Any, tokenizer: Any, suite: HarnessSuite, batch_size: int = 16, max_new_tokens: int | None = None
) -> tuple[list, float, float]:
    """Score a model on an lm-eval suite: ``(item rows in the suite's order, score, stderr)``.

    Args:
        model: a Hugging Face causal LM (a decode-time composite cannot be scored by lm-eval).
        tokenizer: its tokenizer.
        suite: from ``load_harness_suite``.
        batch_size: lm-eval's batch size.
        max_new_tokens: generation cap for ``generate_until`` tasks (lm-eval's ``max_gen_toks``; default: the
            task's).
    """
    import torch

    lm_eval = _lm_eval(suite.name)
    from lm_eval.models.huggingface import HFLM

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise SuiteFormatError(
            f"suite {suite.name!r}: lm-eval scores Hugging Face models only, not a {type(model).__name__}"
        )
    with _generators_kept():
        loaded = _load(suite.task, suite.include, suite.defaults)
    wanted: dict[str, list[int]] = {}
    for item in suite.items:
        wanted.setdefault(item[TASK_KEY], []).append(item["doc_id"])
    # lm-eval walks the chosen documents in split order and labels the k-th with samples[k]: they must be sorted
    wanted = {t: sorted(ids) for t, ids in wanted.items()}
    group = loaded["groups"].get(suite.task)
    whole = group is not None and set(wanted) == set(loaded["tasks"])
    tasks = [group] if whole else [loaded["tasks"][t] for t in wanted]
    if len(loaded["tasks"]) == 1 and suite.task in loaded["tasks"]:
        tasks = [loaded["tasks"][suite.task]]
    gen = {"max_gen_toks": max_new_tokens} if max_new_tokens else None
    with _quiet(), _generators_kept():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=_manager(suite.include, suite.defaults), samples=wanted,
            log_samples=True, gen_kwargs=gen,
        )  # fmt: skip
    metric, _, filt = suite.metric_key.partition(",")
    by_doc = {t: {s["doc_id"]: s for s in out["samples"].get(t, []) if s.get("filter", filt) == filt} for t in wanted}
    rows = []
    for item in suite.items:
        sample = by_doc[item[TASK_KEY]].get(item["doc_id"])
        if sample is None:
            raise RuntimeError(f"suite {suite.name!r}: lm-eval returned no sample for {item['id']!r}")
        rows.append(_row(item, sample, metric, loaded["tasks"][item[TASK_KEY]].OUTPUT_TYPE))
    reported = out["results"].get(suite.task, {})
    score = reported.get(suite.metric_key)
    if isinstance(score, int | float) and (whole or suite.task in loaded["tasks"]):
        stderr = reported.get(f"{metric}_stderr,{filt}")
        return rows, float(score), float(stderr) if isinstance(stderr, int | float) else math.nan
    from ftlab.evals.scorers import mean_stderr

    mean, stderr = mean_stderr([r.score for r in rows])
    return rows, mean, stderr
