"""Per-item explanations of forgetting: for the items of each retained suite that a fine-tune forgot most, the base
and tuned answers side by side, the tuning contribution (TuCo) on the item's prompt, and whether the best repair
point gets the item back.

Two halves:

- at run time (``ftlab run``, after an arm is evaluated): ``explain_arm`` picks each retained suite's ``k`` worst
  items (``worst_items``: the base scored higher than the arm, largest drop first, ties by item id), computes TuCo on
  their prompts with the base and tuned models (``ftlab.analysis.tuco``) and writes ``{suite: {item_id: tuco}}`` as
  ``<arm folder>/tuco_items.json``, registered in the store as the arm's ``tuco-items`` artifact;
- at report time: ``explanations`` reads the items, the stored TuCo and the repair points back from the store and
  the run's ``RunSummary`` into plain rows (``summary.json``'s ``explanations``, the report's per-item section,
  ``ftlab explain``).

The best repair point of an arm: the budget search's recommended point when the summary has one (``recommended``),
else the arm's swept point with the best retention (ties: the larger target gain). An item is ``repaired`` when that
point scores it at least as well as the base did; ``None`` when the arm has no repair point or the point did not
score the item.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftlab.atomic import write_json

TUCO_KIND = "tuco-items"  # artifacts kind of an arm's per-item TuCo file
TUCO_FILE = "tuco_items.json"
DEFAULT_K = 5


def worst_items(
    base_rows: list[dict[str, Any]], tuned_rows: list[dict[str, Any]], k: int, higher_is_better: bool = True
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The ``k`` items the tuned model lost most on: ``(base row, tuned row)`` pairs, largest drop first.

    Args:
        base_rows: the base model's item rows (``item_id``, ``score``, and the texts).
        tuned_rows: the tuned model's item rows on the same suite.
        k: how many to keep.
        higher_is_better: the suite's orientation (the drop is base - tuned, or tuned - base for perplexity).

    Returns:
        Pairs for items the base scored better, ordered by the drop (largest first), then by item id.
    """
    sign = 1.0 if higher_is_better else -1.0
    base = {r["item_id"]: r for r in base_rows}
    dropped = [
        (sign * (base[r["item_id"]]["score"] - r["score"]), base[r["item_id"]], r)
        for r in tuned_rows
        if r["item_id"] in base and sign * (base[r["item_id"]]["score"] - r["score"]) > 0
    ]
    dropped.sort(key=lambda x: (-x[0], str(x[1]["item_id"])))
    return [(b, t) for _, b, t in dropped[:k]]


def item_tuco(base_model: Any, tuned_model: Any, tokenizer: Any, prompts: dict[str, str]) -> dict[str, float]:
    """TuCo of each item's prompt (``ftlab.analysis.tuco.tuning_contribution``, chat-templated as evaluation asks it).

    Args:
        base_model: the base model.
        tuned_model: its fine-tune, on the same device.
        tokenizer: the tuned model's tokenizer.
        prompts: item id -> prompt.

    Returns:
        item id -> TuCo in [0, 1].
    """
    import torch

    from ftlab.analysis.tuco import tuning_contribution

    if not prompts:
        return {}
    ids = list(prompts)
    with torch.no_grad():
        got = tuning_contribution(base_model, tuned_model, tokenizer, [prompts[i] for i in ids], ids=ids)
    return {row["id"]: float(row["tuco"]) for row in got["prompts"]}


def explain_arm(
    store: Any, run_id: str, arm: str, stage: int, suites: list[str], k: int, base_model: Any, tuned_model: Any,
    tokenizer: Any, arm_dir: str | Path, higher_is_better: dict[str, bool] | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Compute and store TuCo for each suite's ``k`` worst items of one arm (run time; see the module docstring).

    Args:
        store: the run's store.
        run_id: the run.
        arm: the trained arm.
        stage: its last stage (the one whose items are compared with the base's).
        suites: the retained suites to explain.
        k: items per suite.
        base_model: the base model.
        tuned_model: the arm's final model.
        tokenizer: its tokenizer.
        arm_dir: the arm's folder; the file is written there as ``tuco_items.json`` (atomically).
        higher_is_better: suite -> orientation (default: every suite higher-is-better).

    Returns:
        ``{suite: {item_id: tuco}}`` as written (suites the arm forgot nothing on are left out).
    """
    higher_is_better = higher_is_better or {}
    out: dict[str, dict[str, float]] = {}
    for suite in suites:
        if not higher_is_better.get(suite, True):  # perplexity: no prompt to attribute
            continue
        pairs = worst_items(store.items(run_id, "base", 0, suite), store.items(run_id, arm, stage, suite), k)
        prompts = {t["item_id"]: b["prompt"] or "" for b, t in pairs if (b["prompt"] or "").strip()}
        if prompts:
            out[suite] = item_tuco(base_model, tuned_model, tokenizer, prompts)
    path = Path(arm_dir) / TUCO_FILE
    write_json(path, {"arm": arm, "stage": stage, "k": k, "tuco": out})
    store.add_artifact(run_id, arm, TUCO_KIND, str(path))
    return out


def stored_tuco(store: Any, run_id: str, arm: str) -> dict[str, dict[str, float]]:
    """The arm's stored per-item TuCo (``{suite: {item_id: tuco}}``); empty when none was computed or the file is
    gone."""
    for row in store.artifacts(run_id):
        if row["arm"] == arm and row["kind"] == TUCO_KIND:
            try:
                return dict(json.loads(Path(row["path"]).read_text()).get("tuco") or {})
            except (OSError, ValueError, AttributeError):
                return {}
    return {}


def has_tuco(store: Any, run_id: str, arm: str) -> bool:
    """Whether the arm's per-item TuCo was computed and its file still exists."""
    return any(
        row["arm"] == arm and row["kind"] == TUCO_KIND and Path(row["path"]).is_file()
        for row in store.artifacts(run_id)
    )


def _recommended_name(rec: Any, arm: str) -> str | None:
    """A repair point of ``arm`` named by a summary's ``budget`` or ``recommended`` entry (a point name,
    ``{"name"}``, ``{"chosen": {"name"}}``, or any of those under the arm's name, as ``budget`` has them)."""
    if isinstance(rec, str):
        return rec if rec.startswith(arm + "+") else None
    if isinstance(rec, dict):
        for key in (arm, "name", "point", "chosen"):
            if key in rec:
                found = _recommended_name(rec[key], arm)
                if found:
                    return found
    return None


def best_repair_point(summary: Any, arm: str, recommended: Any = None) -> str | None:
    """The repair point of ``arm`` an explanation checks: the recommended one when named and scored, else the
    swept point with the best retention (ties: the larger target gain, then the name); None without points."""
    points = [p for p in summary.points if p.kind == "edit" and p.parent == arm]
    named = _recommended_name(recommended, arm) if recommended is not None else None
    if named and any(p.arm == named for p in points):
        return named
    scored = [p for p in points if p.retention is not None]
    if not scored:
        return None
    return max(scored, key=lambda p: (p.retention, p.gain if p.gain is not None else float("-inf"), p.arm)).arm


def explanations(
    store: Any, summary: Any, recommended: Any = None, k: int | None = None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per trained arm and retained suite, the worst-forgotten items explained (report time).

    Args:
        store: the store holding the run's items.
        summary: the run's ``RunSummary`` (``ftlab.report.summary.load_summary``).
        recommended: the summary's ``budget`` (per arm) or ``recommended`` entry, when the budget search ran.
        k: items per suite (default: the run's ``eval.explain``, else ``DEFAULT_K``); 0 gives nothing.

    Returns:
        ``{arm: {suite: [{"item_id", "prompt", "reference", "base_answer", "tuned_answer", "base_score",
        "tuned_score", "tuco", "repaired", "repair_point", "repair_score", "repair_answer"}]}}``; ``tuco`` is
        None where it was not computed; arms and suites with no forgotten item are left out.
    """
    if k is None:
        k = int((summary.config.get("eval") or {}).get("explain", DEFAULT_K))
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if k <= 0:
        return out
    for arm in summary.arms:
        name = arm["arm"]
        if arm["kind"] != "train" or name not in summary.final_stage:
            continue
        stage = summary.final_stage[name]
        tuco = stored_tuco(store, summary.run_id, name)
        point = best_repair_point(summary, name, recommended)
        for suite in summary.retained:
            hib = summary.higher_is_better(suite)
            if not hib:  # perplexity: no answer to get right or wrong
                continue
            pairs = worst_items(
                store.items(summary.run_id, "base", 0, suite), store.items(summary.run_id, name, stage, suite), k, hib
            )
            if not pairs:
                continue
            repair_rows = {}
            if point is not None:
                repair_rows = {r["item_id"]: r for r in store.items(summary.run_id, point, stage, suite)}
            rows = []
            for base_row, tuned_row in pairs:
                item = tuned_row["item_id"]
                fixed = repair_rows.get(item)
                repaired = None
                if fixed is not None:
                    repaired = fixed["score"] >= base_row["score"] if hib else fixed["score"] <= base_row["score"]
                rows.append(
                    {
                        "item_id": item,
                        "prompt": base_row["prompt"] or "",
                        "reference": base_row["reference"] or "",
                        "base_answer": base_row["output"] or "",
                        "tuned_answer": tuned_row["output"] or "",
                        "base_score": base_row["score"],
                        "tuned_score": tuned_row["score"],
                        "tuco": (tuco.get(suite) or {}).get(item),
                        "repaired": repaired,
                        "repair_point": point,
                        "repair_score": None if fixed is None else fixed["score"],
                        "repair_answer": None if fixed is None else fixed["output"] or "",
                    }  # fmt: skip
                )
            out.setdefault(name, {})[suite] = rows
    return out
