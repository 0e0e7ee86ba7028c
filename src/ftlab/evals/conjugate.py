"""Conjugate prompting: ask a retained suite's questions in a form farther from the fine-tuning distribution, and
measure how much of the lost ability comes back.

The idea is from Kotha, Springer and Raghunathan, "Understanding catastrophic forgetting in language models via
implicit inference" (ICLR 2024): fine-tuning may change which task the model *infers* from a prompt rather than
remove the ability, so a prompt that looks less like the fine-tuning data can bring the ability back. If it does, the
ability was suppressed; if not, it is more likely erased. docs/figures.md, "Conjugate prompting".

Forms (``FORMS``), each a rewrite of a generative suite (``conjugate_suite``):

- ``plain``: the prompt without the chat template, as plain text ``Q: <prompt>`` / ``A:`` (the bare prompt, which
  ends in a full stop, lets a chat model end the text at once: asked that way the embedded model got 2 of 208
  ``world-facts`` questions right, against 134 with its chat template);
- ``fewshot``: the same frame after ``N_SHOTS`` solved question/answer pairs taken from *other* items of the same
  suite (the next items in suite order, wrapping around; never the item itself);

In both frames the answer is cut at the first blank line or the next ``Q:`` (``FRAME_STOPS``).
- ``translate``: the item's prompt in another language, for suites whose items carry ``translations``
  (``{"fr": "..."}``; the first language of the first item that has any). No built-in suite ships translations yet,
  so the form is skipped where there are none.

A form that does not apply to a suite (not generative, no reference answers for the few-shot frame, no translations)
gives ``None``. The rewritten suite is named ``<suite>@<form>``.

``recovery`` turns per-item scores of the base and the tuned model, under the usual prompts and under a form, into
the figure ``recovered = (tuned_conj - tuned) / (base - tuned)`` with paired tests (``ftlab.evals.stats``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ftlab.evals import stats
from ftlab.evals.scorers import as_answers
from ftlab.evals.suites import Suite

FORMS = ("plain", "fewshot", "translate")
N_SHOTS = 3
SEP = "@"  # "<suite>@<form>"
# Where an answer in a Q/A frame ends: the model goes on to write the next question.
FRAME_STOPS = ("\n\n", "\nQ:")
# "suppressed" needs a significant gain under the form and at least this share of the loss back.
MIN_RECOVERED = 0.25


def conjugate_name(suite: str, form: str) -> str:
    """The stored name of a suite asked in a form: ``world-facts@plain``."""
    return f"{suite}{SEP}{form}"


def split_name(name: str) -> tuple[str, str | None]:
    """``("world-facts", "plain")`` for ``world-facts@plain``; ``(name, None)`` for a suite asked as usual."""
    suite, sep, form = name.rpartition(SEP)
    return (suite, form) if sep and form in FORMS else (name, None)


def check_forms(forms: list[str], where: str) -> None:
    """Every form is known.

    Raises:
        ConfigError: naming ``where`` and the bad form.
    """
    from ftlab.config import ConfigError

    for form in forms:
        if form not in FORMS:
            raise ConfigError(f"{where}: unknown conjugate form {form!r}; choose from {', '.join(FORMS)}")


def fewshot_prompt(items: list[dict], index: int, shots: int = N_SHOTS) -> str | None:
    """The few-shot frame of item ``index``: ``shots`` other items with their first reference answer, then the item.

    Args:
        items: the suite's items (each with ``prompt`` and ``answer``).
        index: the item to ask.
        shots: how many solved examples to show (fewer when the suite has fewer other items).

    Returns:
        The frame, or None when the suite has no other item with an answer.
    """
    others = [items[(index + k) % len(items)] for k in range(1, len(items))]
    solved = [it for it in others if _first_answer(it) is not None][:shots]
    if not solved:
        return None
    frame = "".join(f"Q: {it['prompt']}\nA: {_first_answer(it)}\n\n" for it in solved)
    return f"{frame}Q: {items[index]['prompt']}\nA:"


def _first_answer(item: dict) -> str | None:
    if "answer" not in item or item["answer"] is None or "rules" in item:
        return None
    answers = as_answers(item["answer"])
    return answers[0] if answers and answers[0].strip() else None


def conjugate_suite(suite: Suite, form: str, shots: int = N_SHOTS) -> Suite | None:
    """``suite`` asked in ``form``, or None where the form does not apply.

    Args:
        suite: a loaded suite.
        form: one of ``FORMS``.
        shots: solved examples in the ``fewshot`` frame.

    Returns:
        A new suite named ``<suite>@<form>`` with rewritten prompts (items copied; ids, answers and scorer kept),
        scored without the chat template; None when the suite is not generative, or (``fewshot``) has no reference
        answers, or (``translate``) no translations.
    """
    if form not in FORMS:
        raise ValueError(f"unknown conjugate form {form!r}; choose from {', '.join(FORMS)}")
    if suite.kind != "generate" or not suite.items:
        return None
    items = [dict(it) for it in suite.items]
    stops: tuple[str, ...] = ()
    if form == "fewshot":
        prompts = [fewshot_prompt(suite.items, i, shots) for i in range(len(items))]
        if any(p is None for p in prompts):
            return None
        stops = FRAME_STOPS
    elif form == "plain":
        prompts = [f"Q: {it['prompt']}\nA:" for it in items]
        stops = FRAME_STOPS
    elif form == "translate":
        lang = next((next(iter(it["translations"])) for it in items if it.get("translations")), None)
        if lang is None:
            return None
        prompts = [(it.get("translations") or {}).get(lang, it["prompt"]) for it in items]
    for it, prompt in zip(items, prompts, strict=True):
        it["prompt"] = prompt
    return dataclasses.replace(
        suite, name=conjugate_name(suite.name, form), items=items, chat=False, stop_strings=stops
    )


def cut_output(output: str, stops: tuple[str, ...]) -> str:
    """``output`` up to the first of ``stops`` (the whole of it when none occurs), stripped."""
    end = len(output)
    for s in stops:
        found = output.find(s)
        if found != -1:
            end = min(end, found)
    return output[:end].strip()


def _mean(scores: dict[str, float], ids: list[str]) -> float:
    return sum(scores[i] for i in ids) / len(ids)


def recovery(
    base: dict[str, float],
    tuned: dict[str, float],
    base_conj: dict[str, float],
    tuned_conj: dict[str, float],
    confidence: float = 0.95,
) -> dict[str, Any] | None:
    """How much of what the tuned model lost on a suite its answers under a conjugate form win back.

    All four are ``{item_id: score}`` of one higher-is-better suite; the figures use the items all four scored.
    ``recovered = (tuned_conj - tuned) / (base - tuned)``: 0 = nothing comes back, 1 = all of the loss comes back
    (it can exceed 1, or be negative when the form hurts). The verdict:

    - ``no loss``: the tuned model did not lose the suite significantly (paired test base -> tuned), or lost nothing;
    - ``suppressed``: the form raises the tuned model's score significantly (paired test tuned -> tuned_conj) and
      brings back at least ``MIN_RECOVERED`` of the loss;
    - ``erased``: otherwise.

    ``form_gain_base`` (base_conj - base) says how much the form alone moves the base: when it is as large as the
    tuned model's gain under the form, the recovery may be the form's doing rather than a suppressed ability.

    Returns:
        ``{"n", "base", "tuned", "base_conj", "tuned_conj", "lost", "lost_significant", "recovered", "gain",
        "ci", "p_value", "significant", "form_gain_base", "verdict"}``; None when fewer than two items are shared.
    """
    ids = sorted(set(base) & set(tuned) & set(base_conj) & set(tuned_conj))
    if len(ids) < 2:
        return None
    b, t, bc, tc = (_mean(x, ids) for x in (base, tuned, base_conj, tuned_conj))
    lost_test = stats.paired_change([base[i] for i in ids], [tuned[i] for i in ids], confidence=confidence)
    gain_test = stats.paired_change([tuned[i] for i in ids], [tuned_conj[i] for i in ids], confidence=confidence)
    lost = b - t
    recovered = (tc - t) / lost if lost > 0 else None
    lost_significant = bool(lost_test.significant and lost > 0)
    if not lost_significant:
        verdict = "no loss"
    elif gain_test.significant and gain_test.delta > 0 and (recovered or 0.0) >= MIN_RECOVERED:
        verdict = "suppressed"
    else:
        verdict = "erased"
    return {
        "n": len(ids), "base": b, "tuned": t, "base_conj": bc, "tuned_conj": tc, "lost": lost,
        "lost_significant": lost_significant, "recovered": recovered, "gain": tc - t,
        "ci": [gain_test.ci_low, gain_test.ci_high], "p_value": gain_test.p_value,
        "significant": bool(gain_test.significant), "form_gain_base": bc - b, "verdict": verdict,
    }  # fmt: skip


def run_recovery(
    item_scores: dict[tuple[str, int, str], dict[str, float]],
    final_stage: dict[str, int],
    arms: list[str],
    suites: list[str],
    confidence: float = 0.95,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``recovery`` for every arm, suite and form a run scored: ``{arm: {suite: {form: figures}}}``.

    Args:
        item_scores: ``(arm, stage, suite) -> {item_id: score}`` (``RunSummary.item_scores``); the base is
            ``("base", 0, ...)``, a form's scores are stored under ``<suite>@<form>``.
        final_stage: arm -> its last stage.
        arms: the arms to report (the base is left out).
        suites: the suites asked as usual (retained suites).
        confidence: the level of the paired tests.
    """
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for arm in arms:
        stage = final_stage.get(arm)
        if arm == "base" or stage is None:
            continue
        for suite in suites:
            for form in FORMS:
                name = conjugate_name(suite, form)
                parts = [("base", 0, suite), (arm, stage, suite), ("base", 0, name), (arm, stage, name)]
                if not all(k in item_scores for k in parts):
                    continue
                fig = recovery(*(item_scores[k] for k in parts), confidence=confidence)
                if fig is not None:
                    out.setdefault(arm, {}).setdefault(suite, {})[form] = fig
    return out
