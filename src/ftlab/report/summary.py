"""The one source of a run's figures: store rows gathered into plain tables (scores per stage, forgetting figures per
arm, the Pareto front, the accuracy matrix of continual runs, the items each arm forgot).

``load_summary`` reads a run into a ``RunSummary``; ``build_summary`` turns it into the plain dict written as
``summary.json`` and printed as ``ftlab run``'s table; the HTML report (``html.py``, ``plots.py``) and
``ftlab compare`` (``compare_rows``) read the same ``RunSummary``. So every place a figure is shown computes it by the
same rules. Conventions read from the store:

- arm ``base`` holds the base model's scores at stage 0; trained arms hold stages 1..T; edit arms (repair points,
  ``parent`` = the trained arm they were derived from) hold only stage T;
- ``config["stages"]`` lists each stage's target suites, ``config["retained"]`` the retained suites (when the config
  lacks them, the ``role`` column of the results decides).

Every figure is oriented so that bigger is better: target gain = after - before (before - after for a
lower-is-better suite such as perplexity), retained ratio = after / before (before / after for lower-is-better),
1.0 = unchanged. An arm's "after" is its last stage with results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from ftlab.evals.forgetting import continual_metrics, retained_ratio, target_gain
from ftlab.store import Store

BASE = "base"


@dataclass
class Point:
    """One arm's place on the gain-vs-retained plane (``None`` where a figure cannot be computed)."""

    arm: str
    kind: str
    method: str
    parent: str | None
    stage: int  # the stage whose scores are "after"
    gain: float | None  # mean oriented target gain over the target suites
    retained_mean: float | None  # mean retained ratio over the retained suites
    retained_min: float | None  # worst retained ratio
    retained: dict[str, float] = field(default_factory=dict)  # suite -> retained ratio


@dataclass
class RunSummary:
    """Everything the report shows about one run, as plain data."""

    run: dict[str, Any]  # the store's runs row
    config: dict[str, Any]
    arms: list[dict[str, Any]]  # the store's arms rows, base first
    stage_names: list[str]  # stage_names[t - 1] is the name of stage t
    stage_targets: list[list[str]]  # target suites per stage; empty when the config does not say
    targets: list[str]  # all target suites, in stage order
    retained: list[str]
    suites: list[str]  # targets, then retained, then any other suite scored
    scores: dict[tuple[str, int, str], dict[str, Any]]  # (arm, stage, suite) -> results row
    final_stage: dict[str, int]  # arm -> last stage with results
    points: list[Point]
    stage_info: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # arm -> the store's stages rows

    @property
    def run_id(self) -> str:
        return self.run["run_id"]

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)

    def score(self, arm: str, stage: int, suite: str) -> float | None:
        row = self.scores.get((arm, stage, suite))
        return None if row is None else row["score"]

    def higher_is_better(self, suite: str) -> bool:
        for (_, _, s), row in self.scores.items():
            if s == suite:
                return bool(row["higher_is_better"])
        return True


def load_summary(store: Store, run_id: str) -> RunSummary:
    """Read one run from the store into a ``RunSummary``.

    Args:
        store: the store holding the run.
        run_id: a run id or a unique prefix of one.

    Returns:
        The run's tables and forgetting figures.

    Raises:
        KeyError: no run (or more than one) matches ``run_id``.
    """
    run = store.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in store {store.path}")
    run_id = run["run_id"]
    config = json.loads(run["config"] or "{}")
    results = store.results(run_id)
    scores = {(r["arm"], r["stage"], r["suite"]): r for r in results}
    arms = _ordered_arms(store.arms(run_id), results)
    final_stage: dict[str, int] = {}
    for r in results:
        final_stage[r["arm"]] = max(final_stage.get(r["arm"], 0), r["stage"])

    stages_cfg = config.get("stages") or []
    known = {r["suite"] for r in results}
    named = config.get("suite_names") or {}  # the runner records how each suite reference was stored
    stage_targets = [[_suite_name(ref, known, named) for ref in s.get("targets") or []] for s in stages_cfg]
    n_stages = len(stages_cfg) or max([final_stage[a["arm"]] for a in arms if a["kind"] != BASE] or [0])
    stage_names = [
        (stages_cfg[t].get("name") if t < len(stages_cfg) else None) or f"stage {t + 1}" for t in range(n_stages)
    ]
    by_role: dict[str, list[str]] = {"target": [], "retained": []}
    for r in results:
        if r["role"] in by_role and r["suite"] not in by_role[r["role"]]:
            by_role[r["role"]].append(r["suite"])
    targets = _unique([s for group in stage_targets for s in group]) or sorted(by_role["target"])
    retained = _unique([_suite_name(ref, known, named) for ref in config.get("retained") or []]) or sorted(
        by_role["retained"]
    )
    retained = [s for s in retained if s not in targets]  # as the runner does: a suite is a target or retained
    others = sorted({r["suite"] for r in results} - set(targets) - set(retained))
    summary = RunSummary(
        run=run, config=config, arms=arms, stage_names=stage_names, stage_targets=stage_targets, targets=targets,
        retained=retained, suites=targets + retained + others, scores=scores, final_stage=final_stage, points=[],
    )  # fmt: skip
    for row in store.stages(run_id):
        summary.stage_info.setdefault(row["arm"], []).append(row)
    summary.points = [_point(summary, a) for a in arms if a["arm"] != BASE and a["arm"] in final_stage]
    return summary


def _suite_name(ref: str, known: set[str], named: dict[str, str]) -> str:
    """The stored name of a suite the config names by reference: the name the run recorded for it, else (older runs)
    the file stem of a path (its folder's name for a folder), as ``ftlab.evals.load_suite`` names it."""
    if ref in named:
        return named[ref]
    for name in (ref, Path(ref).name, Path(ref).stem):
        if name in known:
            return name
    return ref


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _ordered_arms(arm_rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Base first, then trained arms each followed by their edits, keeping the store's order otherwise."""
    rows = list(arm_rows)
    known = {a["arm"] for a in rows}
    for r in results:  # an arm with results but no arms row (an older writer) still shows up
        if r["arm"] not in known:
            known.add(r["arm"])
            kind = BASE if r["arm"] == BASE else "train"
            rows.append({"arm": r["arm"], "kind": kind, "method": r["arm"], "parent": None, "config": "{}"})
    base = [a for a in rows if a["arm"] == BASE or a["kind"] == BASE]
    rest = [a for a in rows if a not in base]
    ordered = list(base)
    for a in rest:
        if a["kind"] != "edit" or a["parent"] not in {r["arm"] for r in rest}:
            ordered.append(a)
            ordered += [e for e in rest if e["kind"] == "edit" and e["parent"] == a["arm"]]
    return ordered


def _gain(before: float, after: float, higher_is_better: bool) -> float:
    """``target_gain`` oriented so that positive = better for lower-is-better suites too."""
    return target_gain(before, after) if higher_is_better else target_gain(after, before)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _point(summary: RunSummary, arm: dict[str, Any]) -> Point:
    name, stage = arm["arm"], summary.final_stage[arm["arm"]]
    gains = []
    for suite in summary.targets:
        before, after = summary.score(BASE, 0, suite), summary.score(name, stage, suite)
        if before is not None and after is not None:
            gains.append(_gain(before, after, summary.higher_is_better(suite)))
    retained = {}
    for suite in summary.retained:
        before, after = summary.score(BASE, 0, suite), summary.score(name, stage, suite)
        if before is not None and after is not None:
            ratio = _finite(retained_ratio(before, after, summary.higher_is_better(suite)))
            if ratio is not None:
                retained[suite] = ratio
    return Point(
        arm=name, kind=arm["kind"], method=arm["method"], parent=arm["parent"], stage=stage,
        gain=mean(gains) if gains else None, retained_mean=mean(retained.values()) if retained else None,
        retained_min=min(retained.values()) if retained else None, retained=retained,
    )  # fmt: skip


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates, when both coordinates are to be maximised.

    Args:
        points: (x, y) pairs.

    Returns:
        One flag per point: True when no other point is at least as good on both axes and better on one
        (equal points are all on the front).
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def plotted_points(summary: RunSummary) -> list[Point]:
    """The points with both a gain and a retained ratio (the ones the scatter can place)."""
    return [p for p in summary.points if p.gain is not None and p.retained_mean is not None]


def front_arms(summary: RunSummary) -> list[str]:
    """The arms on the Pareto front of (mean retained ratio, target gain), in arm order."""
    points = plotted_points(summary)
    flags = pareto_front([(p.retained_mean, p.gain) for p in points])
    return [p.arm for p, on in zip(points, flags, strict=True) if on]


def reference_arm(summary: RunSummary, point: Point) -> str | None:
    """The plain fine-tune a point is judged against: an edit's parent; for another trained arm, the full fine-tune."""
    if point.kind == "edit":
        return point.parent
    plain = [a["arm"] for a in summary.arms if a["kind"] == "train" and a["method"] == "full"]
    plain.sort(key=lambda a: a != "full")
    return plain[0] if plain and plain[0] != point.arm else None


def beats_reference(summary: RunSummary) -> list[tuple[Point, Point]]:
    """(point, reference) pairs where the point beats its plain fine-tune on both axes (strictly)."""
    by_arm = {p.arm: p for p in plotted_points(summary)}
    wins = []
    for p in by_arm.values():
        ref = by_arm.get(reference_arm(summary, p) or "")
        if ref is not None and p.gain > ref.gain and p.retained_mean > ref.retained_mean:
            wins.append((p, ref))
    return wins


def stage_rows(summary: RunSummary, stage: int) -> list[tuple[str, int]]:
    """The (arm, stage shown) rows of one stage's table: base at stage 0 first, then every arm scored at ``stage``."""
    rows = [(BASE, 0)] if any(k[0] == BASE and k[1] == 0 for k in summary.scores) else []
    for a in summary.arms:
        if a["arm"] != BASE and any(k[0] == a["arm"] and k[1] == stage for k in summary.scores):
            rows.append((a["arm"], stage))
    return rows


def accuracy_matrix(summary: RunSummary, arm: str) -> list[list[float | None]]:
    """Rows 0..T (row 0 = the base model), one column per target suite in ``summary.targets``."""
    rows = [[summary.score(BASE, 0, s) for s in summary.targets]]
    rows += [[summary.score(arm, t, s) for s in summary.targets] for t in range(1, summary.n_stages + 1)]
    return rows


def task_matrix(summary: RunSummary, arm: str) -> list[list[float]] | None:
    """R[t][j]: mean score on stage j+1's target suites after stage t ((T+1) x T); None if any score is missing."""
    R = []
    for t in range(summary.n_stages + 1):
        who, stage = (BASE, 0) if t == 0 else (arm, t)
        row = []
        for suites in summary.stage_targets:
            values = [summary.score(who, stage, s) for s in suites]
            if not values or any(v is None for v in values):
                return None
            row.append(mean(values))
        R.append(row)
    return R


@dataclass
class ForgottenItem:
    """One retained-suite item an arm got worse on than the base model."""

    item_id: str
    prompt: str
    reference: str
    before_output: str
    after_output: str
    before_score: float
    after_score: float
    drop: float  # oriented: before - after (after - before for lower-is-better suites)


def worst_forgotten(store: Store, summary: RunSummary, per_arm: int = 3) -> dict[str, dict[str, list[ForgottenItem]]]:
    """Per retained suite and arm, the items whose score dropped most from the base model to the arm's last stage.

    Args:
        store: the store holding the run's items.
        summary: the run, from ``load_summary``.
        per_arm: how many items to keep per (suite, arm).

    Returns:
        suite -> arm -> items, worst first (arms that forgot nothing on a suite are left out).
    """
    out: dict[str, dict[str, list[ForgottenItem]]] = {}
    for suite in summary.retained:
        base_items = {i["item_id"]: i for i in store.items(summary.run_id, BASE, 0, suite)}
        if not base_items:
            continue
        sign = 1.0 if summary.higher_is_better(suite) else -1.0
        for p in summary.points:
            dropped = []
            for after in store.items(summary.run_id, p.arm, p.stage, suite):
                before = base_items.get(after["item_id"])
                if before is None or sign * (before["score"] - after["score"]) <= 0:
                    continue
                dropped.append(
                    ForgottenItem(
                        item_id=after["item_id"],
                        prompt=before["prompt"] or "",
                        reference=before["reference"] or "",
                        before_output=before["output"] or "",
                        after_output=after["output"] or "",
                        before_score=before["score"],
                        after_score=after["score"],
                        drop=sign * (before["score"] - after["score"]),
                    )  # fmt: skip
                )
            dropped.sort(key=lambda i: (-i.drop, i.item_id))
            if dropped:
                out.setdefault(suite, {})[p.arm] = dropped[:per_arm]
    return out


def arm_continual_metrics(summary: RunSummary, arm: str) -> dict[str, float | None] | None:
    """ACC, BWT, FWT and forgetting of one trained arm (``ftlab.evals.forgetting.continual_metrics`` on
    ``task_matrix``); None for a run of fewer than two stages or an incomplete matrix."""
    R = task_matrix(summary, arm)
    if R is None or len(R) < 3:
        return None
    return {k: _finite(v) for k, v in continual_metrics(R).items()}


# ---------------------------------------------------------------- the plain summary (summary.json, the printed table)
def build_summary(store: Store, run_id: str) -> dict[str, Any]:
    """The run's figures as a plain dict: what ``summary.json`` holds and ``ftlab run`` prints.

    ``{"run_id", "name", "base": {suite: score}, "arms": {arm: {"kind", "parent", "stages": [{suite: score}],
    "target_gain", "retained": {suite: ratio}, "train_seconds", "trainable_params"}}}``. ``stages`` lists a trained
    arm's scores after each stage (an edit arm has only the last). Target gain is the mean over the target suites
    of after minus before, oriented so that positive is better; ``retained`` is after/before per retained suite
    (before/after for a lower-is-better suite). Continual runs (two or more stages) add ``"matrix"`` (``tasks``, one
    column per stage, and ``R``, rows 0..T) and ``"continual"`` (acc, bwt, fwt, forgetting) per trained arm.
    """
    return summary_dict(load_summary(store, run_id))


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """``build_summary`` for an already loaded ``RunSummary``."""
    n = summary.n_stages
    base = {s: summary.score(BASE, 0, s) for s in summary.suites if summary.score(BASE, 0, s) is not None}
    out: dict[str, Any] = {"run_id": summary.run_id, "name": summary.run.get("name"), "base": base, "arms": {}}
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
            "train_seconds": sum(s["train_seconds"] or 0.0 for s in info),
            "trainable_params": max((s["trainable_params"] or 0 for s in info), default=0),
        }
        if arm["kind"] == "train" and n >= 2:
            R = task_matrix(summary, p.arm)
            if R is not None:
                entry["matrix"] = {"tasks": ["+".join(t) for t in summary.stage_targets], "R": R}
                entry["continual"] = continual_metrics(R)
        out["arms"][p.arm] = entry
    return out


# A repair point is worth naming when it keeps at least this share of its arm's target gain.
KEEP_GAIN = 0.8


def repair_lines(summary: dict[str, Any]) -> list[str]:
    """One line per arm with a repair sweep: the point that wins back most of what the arm forgot, keeping the gain.

    "What it forgot" is the arm's worst retained suite (lowest ratio). Among the arm's points that keep at least
    ``KEEP_GAIN`` of its target gain, the one with the highest ratio on that suite is named, if it beats the arm.

    Args:
        summary: a ``build_summary`` dict.
    """
    arms = summary["arms"]
    lines = []
    for name, arm in arms.items():
        points = {k: v for k, v in arms.items() if k.startswith(name + "+")}
        if not points or not arm["retained"] or (arm["target_gain"] or 0) <= 0:
            continue
        worst = min(arm["retained"], key=arm["retained"].get)
        keep = {k: v for k, v in points.items() if (v["target_gain"] or 0) >= KEEP_GAIN * arm["target_gain"]}
        best = max(keep, key=lambda k: keep[k]["retained"].get(worst, 0.0), default=None)
        if best is None or keep[best]["retained"].get(worst, 0.0) <= arm["retained"][worst]:
            lines.append(f"repair of {name}: no point keeps {KEEP_GAIN:.0%} of the gain and recovers {worst}")
            continue
        p = keep[best]
        lines.append(
            f"repair of {name}: {best} keeps {p['target_gain'] / arm['target_gain']:.0%} of the gain and brings "
            f"{worst} from {arm['retained'][worst]:.2f} to {p['retained'][worst]:.2f} of the base"
        )
    return lines


# ---------------------------------------------------------------- two runs side by side (ftlab compare)
def compare_rows(a: RunSummary, b: RunSummary) -> list[dict[str, Any]]:
    """Side-by-side figures of two runs: one row per (arm, metric) with both values and b - a.

    Args:
        a: the first run's ``RunSummary``.
        b: the second run's ``RunSummary``.

    Returns:
        Rows ``{"arm", "metric", "a", "b", "delta"}``: target gain, mean and min retained ratio, then each suite's
        score at the arm's last stage; rows where neither run has a value are left out.
    """
    arms = list(dict.fromkeys([x["arm"] for x in a.arms] + [x["arm"] for x in b.arms]))
    suites = list(dict.fromkeys(a.suites + b.suites))
    rows = []
    for arm in arms:
        pa = {p.arm: p for p in a.points}.get(arm)
        pb = {p.arm: p for p in b.points}.get(arm)
        metrics: list[tuple[str, float | None, float | None]] = [
            ("target gain", pa and pa.gain, pb and pb.gain),
            ("retained (mean)", pa and pa.retained_mean, pb and pb.retained_mean),
            ("retained (min)", pa and pa.retained_min, pb and pb.retained_min),
        ]
        for s in suites:
            metrics.append((s, _final(a, arm, s), _final(b, arm, s)))
        for metric, va, vb in metrics:
            if va is None and vb is None:
                continue
            delta = vb - va if va is not None and vb is not None else None
            rows.append({"arm": arm, "metric": metric, "a": va, "b": vb, "delta": delta})
    return rows


def _final(summary: RunSummary, arm: str, suite: str) -> float | None:
    stage = summary.final_stage.get(arm)
    return None if stage is None else summary.score(arm, stage, suite)
