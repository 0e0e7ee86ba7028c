"""The run's figures as plain data: the summary dict (``summary.json`` and the printed table), the repair lines and
two runs side by side (``ftlab compare``).

Everything here reads a ``RunSummary`` from ``ftlab.report.summary.load_summary``, which computes every figure; this
module only lays them out, so the JSON, the table, the report and the comparison cannot disagree.
"""

from __future__ import annotations

from typing import Any

from ftlab.evals import stats
from ftlab.evals.forgetting import continual_metrics
from ftlab.report.summary import BASE, Point, RunSummary, SuiteChange, load_summary, task_matrix
from ftlab.store import Store


# ---------------------------------------------------------------- the plain summary (summary.json, the printed table)
def build_summary(store: Store, run_id: str) -> dict[str, Any]:
    """The run's figures as a plain dict: what ``summary.json`` holds and ``ftlab run`` prints.

    ``{"run_id", "name", "confidence", "base": {suite: score}, "base_noise": {suite: {"n", "stderr"}},
    "arms": {arm: {"kind", "parent", "stages": [{suite: score}], "target_gain", "retained": {suite: ratio},
    "retention", "suites": {suite: {...}},
    "train_seconds", "trainable_params"}}}``.

    - ``stages`` lists a trained arm's scores after each stage (an edit arm has only the last).
    - ``target_gain`` is the mean over the target suites of after minus before, oriented so that positive is better.
    - ``suites`` holds every suite's final figures against the base on the same items: ``score``, ``n``,
      ``stderr``, ``delta`` (oriented: positive is better), ``ci`` (``[lo, hi]`` at the run's ``confidence``),
      ``p_value``, ``significant``, ``floor`` (the base is not clearly above the suite's floor), ``ratio``,
      ``too_few_items``, the test's ``method`` and the suite's ``role``; an edit arm's also holds ``vs_parent``,
      the same test against the arm it repairs.
    - ``retained`` is after/before per retained suite off the floor (before/after for a lower-is-better suite);
      ``retention``, the Pareto plot's x, is their mean with each ratio capped at 1 (1.0 = nothing lost).
    - Continual runs (two or more stages) add ``"matrix"`` (``tasks``, one column per stage, and ``R``, rows 0..T)
      and ``"continual"`` (acc, bwt, fwt, forgetting) per trained arm.
    - ``"conjugate"`` (runs with ``eval.conjugate``): ``{arm: {suite: {form: {"n", "base", "tuned", "base_conj",
      "tuned_conj", "lost", "recovered", "verdict", ...}}}}`` (``conjugate_figures``).
    - ``"explanations"`` (``eval.explain`` > 0): ``{arm: {suite: [{"item_id", "prompt", "reference",
      "base_answer", "tuned_answer", "tuco", "repaired", "repair_point", ...}]}}``, the worst-forgotten items of
      each trained arm (``ftlab.analysis.explain.explanations``).
    - ``"budget"`` and ``"recommended"`` (``keep:``): each arm's forgetting-budget search (``budget_entry``) and the
      run's recommended model (``recommended``); see docs/figures.md, "The forgetting budget".
    """
    from ftlab.analysis.explain import explanations

    summary = load_summary(store, run_id)
    out = summary_dict(summary)
    # per-item explanations (analysis/explain.py), checked against each arm's budget point where a search ran
    explained = explanations(store, summary, out.get("budget") or out.get("recommended"))
    if explained:
        out["explanations"] = explained
    return out


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """``build_summary`` for an already loaded ``RunSummary``."""
    n = summary.n_stages
    base = {s: summary.score(BASE, 0, s) for s in summary.suites if summary.score(BASE, 0, s) is not None}
    out: dict[str, Any] = {
        "run_id": summary.run_id, "name": summary.run.get("name"), "confidence": summary.confidence, "base": base,
        "base_noise": {
            s: {"n": row["n"], "stderr": row["stderr"]}
            for s in base if (row := summary.scores.get((BASE, 0, s))) is not None
        },
        "arms": {},
    }  # fmt: skip
    kinds = {a["arm"]: a for a in summary.arms}
    for p in summary.points:
        arm = kinds[p.arm]
        first = 1 if arm["kind"] == "train" else n
        stages = [
            {s: summary.score(p.arm, t, s) for s in summary.suites if summary.score(p.arm, t, s) is not None}
            for t in range(first, n + 1)
        ]
        info = summary.stage_info.get(p.parent or p.arm, [])
        entry: dict[str, Any] = {
            "kind": arm["kind"],
            "parent": arm["parent"],
            "stages": stages,
            "target_gain": p.gain,
            "retained": dict(p.retained),
            "retention": p.retention,
            "suites": {s: _suite_entry(summary, p, s, c) for s, c in p.changes.items()},
            "train_seconds": sum(s["train_seconds"] or 0.0 for s in info),
            "trainable_params": max((s["trainable_params"] or 0 for s in info), default=0),
        }
        if arm["kind"] == "train" and n >= 2:
            R = task_matrix(summary, p.arm)
            if R is not None:
                entry["matrix"] = {"tasks": ["+".join(t) for t in summary.stage_targets], "R": R}
                entry["continual"] = continual_metrics(R)
        out["arms"][p.arm] = entry
    conjugate = conjugate_figures(summary)
    if conjugate:
        out["conjugate"] = conjugate
    if summary.budgets:  # `keep:` (ftlab.budget): each arm's search, and the recommended model of the run
        out["budget"] = {arm: budget_entry(rec) for arm, rec in summary.budgets.items()}
        out["recommended"] = recommended(out["budget"])
    return out


def budget_entry(record: dict[str, Any]) -> dict[str, Any]:
    """An arm's budget search for ``summary.json``: ``{"arm", "keep", "rule", "met", "name", "edit", "value",
    "target_gain", "gain_significant", "retention", "model", "evaluated", "points", "path", "closest", "reason"}``;
    ``name`` .. ``retention`` describe the chosen point (None when no point met the budget; ``closest`` then names
    the nearest)."""
    chosen = record.get("chosen") or {}
    closest = record.get("closest")
    return {
        "arm": record.get("arm"), "keep": record.get("keep"), "rule": record.get("rule"),
        "met": bool(record.get("met")), "name": chosen.get("name"), "edit": chosen.get("edit"),
        "value": chosen.get("value"), "target_gain": chosen.get("target_gain"),
        "gain_significant": chosen.get("gain_significant"), "retention": chosen.get("retention"),
        "model": record.get("model"),
        "evaluated": record.get("evaluated"), "points": record.get("points"),
        "path": [v.get("name") for v in record.get("path") or []], "reason": record.get("reason"),
        "closest": closest.get("name") if closest else None,
    }  # fmt: skip


def recommended(budgets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's recommended model: among the arms whose search met the budget, the chosen point with the largest
    target gain; when none met, the first arm's entry (``met`` False, its ``closest`` named)."""
    met = [b for b in budgets.values() if b["met"]]
    if met:
        return max(met, key=lambda b: b["target_gain"] if b["target_gain"] is not None else float("-inf"))
    return next(iter(budgets.values()))


def conjugate_figures(summary: RunSummary) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{arm: {suite: {form: figures}}}``: how much of each trained arm's loss on a retained suite its answers under
    a conjugate form win back (``ftlab.evals.conjugate.recovery``); empty when the run asked no suite in a form."""
    from ftlab.evals.conjugate import run_recovery

    trained = [a["arm"] for a in summary.arms if a["kind"] == "train"]
    return run_recovery(summary.item_scores, summary.final_stage, trained, summary.retained, summary.confidence)


def _suite_entry(summary: RunSummary, p: Point, suite: str, change: SuiteChange) -> dict[str, Any]:
    role = "target" if suite in summary.targets else "retained" if suite in summary.retained else "other"
    entry = {"role": role, **change.to_dict()}
    if p.kind == "edit" and p.parent in summary.final_stage:
        vs = summary.change(p.arm, p.stage, suite, ref=(p.parent, summary.final_stage[p.parent]))
        if vs is not None:
            entry["vs_parent"] = {k: vs.to_dict()[k] for k in ("delta", "ci", "p_value", "significant")}
    return entry


# A repair point is worth naming when it keeps at least this share of its arm's target gain.
KEEP_GAIN = 0.8


def repair_lines(summary: dict[str, Any]) -> list[str]:
    """One line per arm with a repair sweep: the point that significantly wins back most of what the arm forgot,
    keeping the gain.

    "What it forgot" is the arm's worst retained suite (lowest ratio) among those whose loss from the base is
    significant. Among the arm's points that keep at least ``KEEP_GAIN`` of its target gain and recover that suite
    significantly (paired test against the arm itself, ``vs_parent``), the one with the highest ratio is named.

    Args:
        summary: a ``build_summary`` dict.
    """
    arms = summary["arms"]
    lines = []
    for name, arm in arms.items():
        points = {k: v for k, v in arms.items() if k.startswith(name + "+")}
        if not points or not arm["retained"] or (arm["target_gain"] or 0) <= 0:
            continue
        suites = arm.get("suites", {})
        lost = {s: r for s, r in arm["retained"].items() if _significant_loss(suites.get(s))}
        if not lost:
            lines.append(f"repair of {name}: no retained suite lost significantly; nothing to repair")
            continue
        worst = min(lost, key=lost.get)
        keep = {k: v for k, v in points.items() if (v["target_gain"] or 0) >= KEEP_GAIN * arm["target_gain"]}
        recovering = {
            k: v
            for k, v in keep.items()
            if v["retained"].get(worst, 0.0) > lost[worst] and _significant_recovery(v.get("suites", {}).get(worst))
        }
        best = max(recovering, key=lambda k: recovering[k]["retained"].get(worst, 0.0), default=None)
        if best is None:
            lines.append(
                f"repair of {name}: no point keeps {KEEP_GAIN:.0%} of the gain and significantly recovers {worst}"
            )
            continue
        p = recovering[best]
        lines.append(
            f"repair of {name}: {best} keeps {p['target_gain'] / arm['target_gain']:.0%} of the gain and brings "
            f"{worst} from {arm['retained'][worst]:.2f} to {p['retained'][worst]:.2f} of the base (significant)"
        )
    return lines


def _significant_loss(entry: dict[str, Any] | None) -> bool:
    """A suite whose change from the base is a significant loss (suites without figures count as lost)."""
    if entry is None:
        return True
    return bool(entry["significant"]) and (entry["delta"] or 0.0) < 0 and not entry["floor"]


def _significant_recovery(entry: dict[str, Any] | None) -> bool:
    """A repair point whose change against its arm on a suite is significant (summaries without tests: true)."""
    vs = (entry or {}).get("vs_parent")
    return vs is None or (bool(vs["significant"]) and (vs["delta"] or 0.0) > 0)


# ---------------------------------------------------------------- two runs side by side (ftlab compare)
def compare_rows(a: RunSummary, b: RunSummary) -> list[dict[str, Any]]:
    """Side-by-side figures of two runs: one row per (arm, metric) with both values and b - a.

    Args:
        a: the first run's ``RunSummary``.
        b: the second run's ``RunSummary``.

    Returns:
        Rows ``{"arm", "metric", "a", "b", "delta", "significant"}``: target gain, retention and min retained ratio,
        then each suite's score at the arm's last stage; rows where neither run has a value are left out. For a
        suite, ``significant`` comes from a paired test over the items both runs scored (at the confidence of
        run ``b``); aggregates carry ``None``.
    """
    arms = list(dict.fromkeys([x["arm"] for x in a.arms] + [x["arm"] for x in b.arms]))
    suites = list(dict.fromkeys(a.suites + b.suites))
    rows = []
    for arm in arms:
        pa = {p.arm: p for p in a.points}.get(arm)
        pb = {p.arm: p for p in b.points}.get(arm)
        metrics: list[tuple[str, float | None, float | None]] = [
            ("target gain", pa and pa.gain, pb and pb.gain),
            ("retention", pa and pa.retention, pb and pb.retention),
            ("retained (min)", pa and pa.retained_min, pb and pb.retained_min),
        ]
        for s in suites:
            metrics.append((s, _final(a, arm, s), _final(b, arm, s)))
        for k, (metric, va, vb) in enumerate(metrics):
            if va is None and vb is None:
                continue
            delta = vb - va if va is not None and vb is not None else None
            significant = _between_runs(a, b, arm, metric) if k >= 3 and delta is not None else None
            rows.append({"arm": arm, "metric": metric, "a": va, "b": vb, "delta": delta, "significant": significant})
    return rows


def _between_runs(a: RunSummary, b: RunSummary, arm: str, suite: str) -> bool | None:
    """Whether an arm's score on a suite differs between two runs, paired over the items both scored."""
    items_a = a.item_scores.get((arm, a.final_stage.get(arm, -1), suite), {})
    items_b = b.item_scores.get((arm, b.final_stage.get(arm, -1), suite), {})
    shared = [i for i in items_a if i in items_b]
    if len(shared) < 2:
        return None
    change = stats.paired_change([items_a[i] for i in shared], [items_b[i] for i in shared], confidence=b.confidence)
    return change.significant


def _final(summary: RunSummary, arm: str, suite: str) -> float | None:
    stage = summary.final_stage.get(arm)
    return None if stage is None else summary.score(arm, stage, suite)
