"""The forgetting budget: the repair point with the largest target gain whose every retained suite keeps at least
``keep`` of the base model's score.

The search (``search``) is pure logic over a callback: ``evaluate(point) -> (scores, fresh)`` gives a point's suite
scores (``SuiteScore``, with per-item rows) and whether it had to be computed (False: read from a cache). It walks
the repair family along knobs that run from the base (``t = 0``) to the fine-tune (``t = 1``), where a larger ``t``
gains more on the target and keeps less:

* ``scale``: ``θ0 + t·(θ_ft − θ0)`` (``edits/scale.py``, setting ``factor = t``);
* ``lines``: LiNeS with α = t and the default β = 1 − α, so the deepest block keeps its whole update and the shallow
  blocks move with t (``edits/lines.py``);
* ``reset``: copy back the ``fraction = 1 − t`` of the entries with the smallest change (``edits/reset.py``,
  ``how="smallest"``);
* ``merge``: task arithmetic of the fine-tune with a partner fine-tune trained with replay
  (``edits/merge.py``, ``lam = t``, so ``t = 0.5`` is their average); only when a partner is given.

Order and cost (``max_evals`` points in all, 8 by default, the fine-tune included; the base is the reference and is
not counted): the fine-tune first (when it meets the budget it is the answer); then bisection on ``scale`` (up to 5
steps: the bracket ``[meets, fails]`` starts at ``[0, 1]`` and halves each step, so the answer is within 1/32 of the
largest factor that meets); then, with what is left, one merge point (with a partner), and LiNeS and partial reset
taking turns, one bisection step each, starting at the best factor scale found (else its smallest failing factor).
A knob stops early when it cannot win: target gain rises with ``t``, so no point that meets below a knob's smallest
failing ``t`` gains more than that failing point did; once that gain is no larger than the best point met so far (or
is zero), the knob's remaining evaluations go to the others. Every evaluated point goes through the callback, which
caches it (the store, in ``ftlab repair`` and ``ftlab run``), so a second search over the same inputs computes
nothing.

The budget rule (docs/figures.md, "The forgetting budget"), per retained suite, with the ratio oriented so 1.0 =
unchanged (``after / before``, ``before / after`` for a lower-is-better suite such as perplexity):

* ``rule="ratio"`` (the default): the suite meets the budget when its ratio is at least ``keep``;
* ``rule="significance"``: it also meets when its ratio is under ``keep`` but the loss beyond the budget is not
  significant: the paired interval of its change from the base (``stats.paired_change`` at ``confidence``, shifted
  onto the suite score as the summary does) reaches the budget line ``keep × base`` (``base / keep`` for
  perplexity).

A suite whose base score is at its floor (``stats.at_floor``) has no meaningful ratio and never decides. A point
meets the budget when every deciding suite does. The chosen point is the one with the largest target gain (mean
oriented gain over the targets) among those that meet, provided that gain is positive; when none does, the result
says so (``met`` False) and names the closest: the point with the smallest worst shortfall ``keep − ratio``.

The second half of the module (``ModelPoints``, ``scores_from_store``, ``run_budget``) is the model I/O around the
search: it applies each point to a tuned model, scores it through a runner that writes the store, and writes the
chosen model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftlab.evals import stats
from ftlab.evals.forgetting import retained_ratio

KNOBS = ("scale", "lines", "reset", "merge")
DEFAULT_KNOBS = ("scale", "lines", "reset")
RULES = ("ratio", "significance")
MAX_EVALS = 8
SCALE_STEPS = 5  # bisection steps on scale: the answer is within 2**-5 of the largest factor that meets


@dataclass
class SuiteScore:
    """One suite's score for one model, with its per-item scores (``{item_id: score}``)."""

    score: float
    higher_is_better: bool = True
    n: int = 0
    items: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Point:
    """A point of the repair family: a knob (``scale``, ``lines``, ``reset``, ``merge``) at ``t`` in [0, 1]."""

    knob: str
    t: float

    @property
    def is_tuned(self) -> bool:
        return self.t >= 1.0 and self.knob != "merge"

    @property
    def edit(self) -> str:
        return self.knob

    @property
    def setting(self) -> str:
        return {"scale": "factor", "lines": "alpha", "reset": "fraction", "merge": "lam"}[self.knob]

    @property
    def value(self) -> float:
        """The edit's setting: ``t`` itself, except reset's fraction ``1 − t``."""
        return _round(1.0 - self.t if self.knob == "reset" else self.t)

    @property
    def settings(self) -> dict[str, Any]:
        """Keyword settings of the edit (``ftlab.edits.EDITS[edit]``)."""
        extra = {"reset": {"how": "smallest"}, "merge": {"method": "task_arithmetic"}}.get(self.knob, {})
        return {self.setting: self.value, **extra}

    @property
    def label(self) -> str:
        """``<edit>=<value>``, as ``post:`` sweeps name their points (so a swept point is reused); reset, which the
        search runs with ``how="smallest"``, is labelled as a two-setting sweep names it (``fraction0.5,howsmallest``)
        so it never takes the scores of a swept random reset."""
        if self.knob == "reset":
            return f"reset=fraction{self.value},howsmallest"
        return f"{self.edit}={self.value}"

    def name(self, arm: str) -> str:
        """Its arm name in the store: the tuned arm itself at ``t = 1``, else ``<arm>+<edit>=<value>``."""
        return arm if self.is_tuned else f"{arm}+{self.label}"


@dataclass
class Visit:
    """One evaluated point and how it stands against the budget."""

    point: Point
    gain: float | None
    ratios: dict[str, float | None]  # retained suite -> oriented ratio (None: at the floor, or no score)
    suites: dict[str, dict[str, Any]]  # retained suite -> {"ratio", "meets", "beyond", "floor"}
    meets: bool
    shortfall: float  # worst keep - ratio over the deciding suites (<= 0 when every ratio keeps the budget)
    fresh: bool  # computed now (False: from the cache)
    # whether every target's gain over the base is significant (paired test at the search's confidence; None: no
    # per-item rows). A point can meet the budget with a gain of one item: this says whether the gain is real.
    gain_significant: bool | None = None

    def to_dict(self, arm: str = "tuned") -> dict[str, Any]:
        return {
            "name": self.point.name(arm), "edit": self.point.edit, "value": self.point.value,
            "target_gain": self.gain, "gain_significant": self.gain_significant,
            "retention": {s: r for s, r in self.ratios.items() if r is not None},
            "suites": self.suites, "meets": self.meets, "fresh": self.fresh,
            "shortfall": self.shortfall if math.isfinite(self.shortfall) else None,
        }  # fmt: skip


@dataclass
class SearchResult:
    keep: float
    rule: str
    path: list[Visit]
    chosen: Visit | None
    closest: Visit | None
    reason: str

    @property
    def met(self) -> bool:
        return self.chosen is not None

    @property
    def evaluated(self) -> int:
        return sum(v.fresh for v in self.path)

    def to_dict(self, arm: str = "tuned") -> dict[str, Any]:
        """``{"chosen", "closest", "met", "evaluated", "points", "keep", "rule", "reason", "path"}``."""
        return {
            "chosen": self.chosen.to_dict(arm) if self.chosen else None,
            "closest": self.closest.to_dict(arm) if self.closest else None,
            "met": self.met, "evaluated": self.evaluated, "points": len(self.path), "keep": self.keep,
            "rule": self.rule, "reason": self.reason, "path": [v.to_dict(arm) for v in self.path],
        }  # fmt: skip


def _round(x: float) -> float:
    return round(float(x), 6)


GAIN_NOT_SIGNIFICANT = "note: its target gain is not significant (paired test over the target items)"


def gain_text(gain: float | None, significant: bool | None) -> str:
    """A point's target gain for a console: ``+0.438``, ``+0.062 (n.s.)`` when its paired test says it may be noise,
    ``n/a`` without targets."""
    if gain is None:
        return "n/a"
    return f"{gain:+.3f}" + (" (n.s.)" if significant is False and gain else "")


def check_keep(keep: Any, where: str = "keep") -> float:
    """``keep`` as a float in (0, 1]; a ValueError naming ``where`` otherwise."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"{where}: {keep!r} is not a number in (0, 1] (the share of each retained score to keep)")
    return float(keep)


# ---------------------------------------------------------------------------------------------------- the rule
def beyond_budget(base: SuiteScore, after: SuiteScore, keep: float, confidence: float = 0.95) -> bool | None:
    """Whether a suite's loss beyond the budget is significant: the whole paired interval of its oriented change from
    the base lies below the budget line (``keep × base``, ``base / keep`` for lower-is-better). None without at least
    two shared items."""
    shared = [i for i in base.items if i in after.items]
    if len(shared) < 2:
        return None
    sign = 1.0 if base.higher_is_better else -1.0
    try:
        change = stats.paired_change(
            [base.items[i] for i in shared], [after.items[i] for i in shared], confidence=confidence
        )
    except ValueError:
        return None
    delta = sign * (after.score - base.score)
    shift = delta - sign * change.delta  # onto the suite score (perplexity pools tokens), as the summary does
    _, high = sorted((sign * change.ci_low + shift, sign * change.ci_high + shift))
    line = keep * base.score if base.higher_is_better else base.score / keep
    return high < sign * (line - base.score)


def judge(
    point: Point,
    scores: dict[str, SuiteScore],
    base: dict[str, SuiteScore],
    targets: list[str],
    retained: list[str],
    keep: float,
    *,
    floors: dict[str, float | None] | None = None,
    confidence: float = 0.95,
    rule: str = "ratio",
    fresh: bool = True,
) -> Visit:
    """A point's target gain and per-suite standing against the budget (the module docstring's rule)."""
    gains, real = [], []
    for s in targets:
        if s in scores and s in base:
            sign = 1.0 if base[s].higher_is_better else -1.0
            gains.append(sign * (scores[s].score - base[s].score))
            real.append(_gain_significant(base[s], scores[s], confidence))
    ratios: dict[str, float | None] = {}
    suites: dict[str, dict[str, Any]] = {}
    shortfalls = []
    for s in retained:
        b, a = base.get(s), scores.get(s)
        if b is None or a is None:
            ratios[s] = None
            suites[s] = {"ratio": None, "meets": False, "beyond": None, "floor": False}
            shortfalls.append(math.inf)
            continue
        floor = (floors or {}).get(s, 0.0 if b.higher_is_better else None)
        n = b.n or len(b.items)
        if (
            floor is not None
            and b.higher_is_better
            and 0 <= b.score <= 1
            and stats.at_floor(b.score, n, floor, confidence)
        ):
            ratios[s] = None
            suites[s] = {"ratio": None, "meets": True, "beyond": None, "floor": True}
            continue
        ratio = retained_ratio(b.score, a.score, b.higher_is_better)
        ratio = ratio if math.isfinite(ratio) else 0.0
        beyond = beyond_budget(b, a, keep, confidence)
        ok = ratio >= keep or (rule == "significance" and beyond is False)
        ratios[s] = ratio
        suites[s] = {"ratio": ratio, "meets": ok, "beyond": beyond, "floor": False}
        shortfalls.append(keep - ratio)
    shortfall = max(shortfalls, default=0.0)
    return Visit(
        point=point, gain=sum(gains) / len(gains) if gains else None, ratios=ratios, suites=suites,
        meets=all(v["meets"] for v in suites.values()), shortfall=shortfall, fresh=fresh,
        gain_significant=None if not real or None in real else all(real),
    )  # fmt: skip


def _gain_significant(base: SuiteScore, after: SuiteScore, confidence: float) -> bool | None:
    """Whether a target suite's change from the base is a significant gain (paired test over the shared items)."""
    shared = [i for i in base.items if i in after.items]
    if len(shared) < 2:
        return None
    try:
        change = stats.paired_change([base.items[i] for i in shared], [after.items[i] for i in shared],
                                     confidence=confidence)  # fmt: skip
    except ValueError:
        return None
    sign = 1.0 if base.higher_is_better else -1.0
    return bool(change.significant and sign * change.delta > 0)


# ---------------------------------------------------------------------------------------------------- the search
@dataclass
class _Bracket:
    """A knob's bisection state: ``lo`` the largest t that met (0: none yet), ``hi`` the smallest that failed (1: the
    fine-tune), ``hi_gain`` the target gain there, ``t`` the next point to visit."""

    knob: str
    t: float
    lo: float = 0.0
    hi: float = 1.0
    hi_gain: float | None = None


def search(
    keep: float,
    base: dict[str, SuiteScore],
    targets: list[str],
    retained: list[str],
    evaluate: Callable[[Point], tuple[dict[str, SuiteScore], bool]],
    *,
    floors: dict[str, float | None] | None = None,
    confidence: float = 0.95,
    rule: str = "ratio",
    max_evals: int = MAX_EVALS,
    knobs: tuple[str, ...] = DEFAULT_KNOBS,
    partner: bool = False,
    on_visit: Callable[[Visit], None] | None = None,
) -> SearchResult:
    """Find the point with the largest target gain that keeps ``keep`` of every retained suite.

    Args:
        keep: the budget, in (0, 1].
        base: the base model's scores, suite -> ``SuiteScore`` (targets and retained).
        targets: target suites (gain is their mean oriented change).
        retained: retained suites (each must keep the budget).
        evaluate: ``point -> (scores, fresh)``; ``fresh`` is False when the scores came from a cache.
        floors: suite -> floor (chance, 0; None: no floor); missing suites get 0 (higher-is-better) or none.
        confidence: level of the paired tests (significance rule and ``beyond``).
        rule: ``ratio`` or ``significance`` (module docstring).
        max_evals: the most points visited, the fine-tune included.
        knobs: knobs to search after the fine-tune, in order; ``scale`` is always first when named.
        partner: a replay-trained partner fine-tune is available (adds one ``merge`` point).
        on_visit: called with each visit as it is made (progress).

    Returns:
        The ``SearchResult``: path (every visit in order), chosen (None when no point meets), closest, reason.
    """
    keep = check_keep(keep)
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r} is not one of {', '.join(RULES)}")
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
        raise ValueError(f"knobs: {', '.join(unknown)} not among {', '.join(KNOBS)}")
    if max_evals < 1:
        raise ValueError(f"max_evals: {max_evals} is below 1")
    path: list[Visit] = []
    seen: dict[Point, Visit] = {}

    def visit(point: Point) -> Visit | None:
        point = Point(point.knob, _round(point.t))
        if point.is_tuned:
            point = Point("scale", 1.0)
        if point in seen:
            return seen[point]
        if len(path) >= max_evals:
            return None
        scores, fresh = evaluate(point)
        v = judge(point, scores, base, targets, retained, keep, floors=floors, confidence=confidence, rule=rule,
                  fresh=fresh)  # fmt: skip
        path.append(v)
        seen[point] = v
        if on_visit:
            on_visit(v)
        return v

    def best_gain() -> float:
        """The largest gain among the points that met so far (0 when none): what another knob must beat."""
        return max([0.0, *(v.gain for v in path if v.meets and v.gain is not None)])

    def step(b: _Bracket) -> bool:
        """One bisection step on a knob's bracket; False when the evaluation budget is spent."""
        v = visit(Point(b.knob, b.t))
        if v is None:
            return False
        if v.meets:
            b.lo = b.t
        else:
            b.hi, b.hi_gain = b.t, v.gain
        b.t = (b.lo + b.hi) / 2
        return True

    def live(b: _Bracket) -> bool:
        """Whether bisecting on can still find a better point: the bracket is wider than the resolution, and the gain
        at its failing end beats the best point met so far (gain rises with t, so every point that meets below the
        failing end gains at most that much)."""
        if b.hi - b.lo < 2.0**-SCALE_STEPS / 2:
            return False
        return b.hi_gain is None or b.hi_gain > best_gain()

    tuned = visit(Point("scale", 1.0))
    assert tuned is not None
    reason = ""
    if tuned.gain is None or tuned.gain <= 0:
        reason = "the fine-tune has no target gain over the base; there is nothing to keep"
    elif tuned.meets:
        reason = "the fine-tune itself keeps the budget"
    else:
        scale = _Bracket("scale", t=0.5, hi_gain=tuned.gain)
        if "scale" in knobs:
            for _ in range(SCALE_STEPS):
                if not live(scale) or not step(scale):
                    break
        if partner:
            visit(Point("merge", 0.5))
        # the other knobs start where scale's answer lies (its best factor, else its smallest failing one) and take
        # turns, one evaluation each, until the budget is spent or none can beat the best point met
        first = scale.lo if scale.lo > 0 else (scale.hi if scale.hi < 1 else 0.5)
        others = [_Bracket(k, t=first, hi_gain=tuned.gain) for k in knobs if k not in ("scale", "merge")]
        while len(path) < max_evals:
            turn = [b for b in others if live(b)]
            if not turn or not all(step(b) for b in turn if live(b)):
                break
    meeting = [v for v in path if v.meets and v.gain is not None and v.gain > 0]
    chosen = max(meeting, key=lambda v: (v.gain, -path.index(v)), default=None)
    closest = None
    if chosen is None:
        pool = [v for v in path if v.gain is not None and v.gain > 0] or path
        closest = min(pool, key=lambda v: (v.shortfall, -(v.gain or 0.0)))
        if not reason:
            reason = f"no point keeps {keep:g} of every retained suite; closest: {closest.point.label}"
    elif not reason:
        reason = f"{chosen.point.label} has the largest target gain among the points that keep the budget"
    return SearchResult(keep=keep, rule=rule, path=path, chosen=chosen, closest=closest, reason=reason)
