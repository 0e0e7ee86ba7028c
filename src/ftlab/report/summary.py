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
from statistics import NormalDist, mean
from typing import Any

from ftlab.evals import stats
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
    retention: float | None  # the plot's x: mean of the retained ratios each capped at 1 (floor suites left out)
    retained_min: float | None  # worst retained ratio (floor suites left out)
    retained: dict[str, float] = field(default_factory=dict)  # suite -> retained ratio (suites off the floor)
    changes: dict[str, SuiteChange] = field(default_factory=dict)  # suite -> change from the base, with its noise


@dataclass
class SuiteChange:
    """One suite's score for one arm against the base model on the same items, with its noise.

    ``delta`` and ``ci`` are oriented so that positive is better (``before - after`` for perplexity); for 0/1 items
    they are in points of accuracy (``-0.15`` = 15 points lost).
    """

    score: float
    n: int
    stderr: float
    delta: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    significant: bool
    floor: bool  # the base is not clearly above the suite's floor: no ratio, left out of every aggregate
    ratio: float | None  # after/before (before/after for lower-is-better); None at the floor
    too_few_items: bool  # fewer items than a 10-point change needs at the run's confidence level
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score, "n": self.n, "stderr": self.stderr, "delta": self.delta,
            "ci": list(self.ci) if self.ci else None, "p_value": self.p_value, "significant": self.significant,
            "floor": self.floor, "ratio": self.ratio, "too_few_items": self.too_few_items, "method": self.method,
        }  # fmt: skip


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
    item_scores: dict[tuple[str, int, str], dict[str, float]] = field(default_factory=dict)  # -> {item_id: score}
    confidence: float = 0.95  # level of every interval and test
    floors: dict[str, float | None] = field(default_factory=dict)  # suite -> floor (chance, 0, None: no floor)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> its budget search (ftlab.budget)

    def change(self, arm: str, stage: int, suite: str, ref: tuple[str, int] = (BASE, 0)) -> SuiteChange | None:
        """The suite's change from ``ref`` (default: the base model) to ``arm`` at ``stage``, paired over the items
        both were scored on; None when either has no score."""
        key = (arm, stage, suite, ref)
        if key not in self._changes:
            self._changes[key] = _suite_change(self, arm, stage, suite, ref)
        return self._changes[key]

    _changes: dict[tuple, SuiteChange | None] = field(default_factory=dict, repr=False)

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
        confidence=float((config.get("eval") or {}).get("confidence", 0.95)),
        floors=dict(config.get("suite_floors") or {}),
    )  # fmt: skip
    for row in store.run_items(run_id):
        summary.item_scores.setdefault((row["arm"], row["stage"], row["suite"]), {})[row["item_id"]] = row["score"]
    for row in store.stages(run_id):
        summary.stage_info.setdefault(row["arm"], []).append(row)
    summary.budgets = _budgets(store, run_id)
    summary.points = [_point(summary, a) for a in arms if a["arm"] != BASE and a["arm"] in final_stage]
    return summary


def _budgets(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """arm -> the record of its forgetting-budget search (``<out>/arms/<arm>/budget.json``, the arm's ``budget``
    artifact; ``ftlab.budget_models.run_budget``); arms whose record is gone are left out."""
    out = {}
    for row in store.artifacts(run_id):
        if row["kind"] == "budget":
            try:
                out[row["arm"]] = json.loads(Path(row["path"]).read_text())
            except (OSError, ValueError):
                continue
    return out


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


def _suite_change(summary: RunSummary, arm: str, stage: int, suite: str, ref: tuple[str, int]) -> SuiteChange | None:
    """See ``RunSummary.change``: the paired test over shared items, or (without items) a normal approximation."""
    before, after = summary.scores.get((*ref, suite)), summary.scores.get((arm, stage, suite))
    if before is None or after is None:
        return None
    hib = bool(after["higher_is_better"])
    sign = 1.0 if hib else -1.0
    conf = summary.confidence
    a_items = summary.item_scores.get((*ref, suite), {})
    b_items = summary.item_scores.get((arm, stage, suite), {})
    shared = [i for i in a_items if i in b_items]
    delta = sign * (after["score"] - before["score"])
    if len(shared) >= 2:
        change = stats.paired_change([a_items[i] for i in shared], [b_items[i] for i in shared], confidence=conf)
        # The test runs on item means; the suite score may aggregate differently (perplexity pools tokens), so the
        # interval is shifted onto the suite-level change.
        shift = delta - sign * change.delta
        lo, hi = sorted((sign * change.ci_low + shift, sign * change.ci_high + shift))
        ci, p_value, significant, method = (lo, hi), change.p_value, change.significant, change.method
    else:
        se = math.hypot(before["stderr"] or 0.0, after["stderr"] or 0.0)
        half = NormalDist().inv_cdf(1 - (1 - conf) / 2) * se
        ci, method = (delta - half, delta + half), "unpaired-normal"
        significant = se > 0 and not ci[0] <= 0 <= ci[1]
        p_value = 2 * (1 - NormalDist().cdf(abs(delta) / se)) if se > 0 else None
    floor_value = summary.floors.get(suite, 0.0 if hib else None)
    n_base = before["n"] or len(a_items)
    floor = floor_value is not None and stats.at_floor(before["score"], n_base, floor_value, conf)
    ratio = None if floor else _finite(retained_ratio(before["score"], after["score"], hib))
    too_few = hib and stats.too_few_items(after["n"] or len(b_items), confidence=conf)
    return SuiteChange(
        score=after["score"], n=after["n"] or len(b_items), stderr=after["stderr"] or 0.0, delta=delta, ci=ci,
        p_value=p_value, significant=bool(significant), floor=floor, ratio=ratio, too_few_items=too_few,
        method=method,
    )  # fmt: skip


def _point(summary: RunSummary, arm: dict[str, Any]) -> Point:
    name, stage = arm["arm"], summary.final_stage[arm["arm"]]
    gains = []
    for suite in summary.targets:
        before, after = summary.score(BASE, 0, suite), summary.score(name, stage, suite)
        if before is not None and after is not None:
            gains.append(_gain(before, after, summary.higher_is_better(suite)))
    changes = {s: c for s in summary.suites if (c := summary.change(name, stage, s)) is not None}
    retained = {s: changes[s].ratio for s in summary.retained if s in changes and changes[s].ratio is not None}
    return Point(
        arm=name, kind=arm["kind"], method=arm["method"], parent=arm["parent"], stage=stage,
        gain=mean(gains) if gains else None, retention=stats.capped_retention(retained),
        retained_min=min(retained.values()) if retained else None, retained=retained, changes=changes,
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
    return [p for p in summary.points if p.gain is not None and p.retention is not None]


def front_arms(summary: RunSummary) -> list[str]:
    """The arms on the Pareto front of (retention, target gain), in arm order."""
    points = plotted_points(summary)
    flags = pareto_front([(p.retention, p.gain) for p in points])
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
        if ref is not None and p.gain > ref.gain and p.retention > ref.retention:
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
