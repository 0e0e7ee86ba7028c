"""The forgetting budget over real models: stored scores, the search's evaluate callback, and the runs of ``keep:``.

``ftlab.budget`` holds the search itself (pure: points, judging, bisection); this module applies its points to
models, scores them through the evaluator and the store, and writes the recommended model (``ftlab run`` with
``keep:``, ``ftlab repair``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftlab.budget import (
    GAIN_NOT_SIGNIFICANT,
    KNOBS,
    MAX_EVALS,
    RULES,
    Point,
    SearchResult,
    SuiteScore,
    Visit,
    beyond_budget,
    check_keep,
    gain_text,
    judge,
    search,
)


def scores_from_store(
    store: Any, run_id: str, arm: str, stage: int, suites: list[str]
) -> dict[str, SuiteScore] | None:
    """A model's stored scores on ``suites`` (with per-item scores), or None when any is missing."""
    rows = {r["suite"]: r for r in store.results(run_id, arm) if r["stage"] == stage}
    if any(s not in rows for s in suites):
        return None
    out = {}
    for s in suites:
        r = rows[s]
        items = {i["item_id"]: i["score"] for i in store.items(run_id, arm, stage, s)}
        out[s] = SuiteScore(float(r["score"]), bool(r["higher_is_better"]), int(r["n"] or len(items)), items)
    return out


class ModelPoints:
    """The search's ``evaluate`` callback over real models: applies a point's weight edit to the tuned model, scores
    it with ``run(model, tokenizer, arm_name, stage)`` (which writes missing results to the store), and reads the
    scores back from the store, so every point is cached there.

    Args:
        store, run_id, arm, stage: where the points live (``<arm>+<edit>=<value>`` at ``stage``; the tuned model is
            ``arm`` itself).
        suites: every suite a point is scored on (targets and retained).
        base_model, tuned_model, tokenizer: the models; the tuned model is edited in place and restored by
            ``restore``.
        run: ``(model, tokenizer, arm_name, stage) -> None``.
        partner_model: a replay-trained fine-tune of the same base for ``merge`` points (optional).
    """

    def __init__(
        self, store: Any, run_id: str, arm: str, stage: int, suites: list[str], base_model: Any, tuned_model: Any,
        tokenizer: Any, run: Callable[[Any, Any, str, int], None], partner_model: Any = None,
    ) -> None:  # fmt: skip
        self.store, self.run_id, self.arm, self.stage, self.suites = store, run_id, arm, stage, suites
        self.base_model, self.model, self.tokenizer, self.run = base_model, tuned_model, tokenizer, run
        self.partner_model = partner_model
        self._base_sd = self._tuned_sd = self._partner_sd = None

    def _sds(self) -> tuple[Any, Any]:
        from ftlab.models import state_dict_fp32

        if self._tuned_sd is None:
            self._base_sd, self._tuned_sd = state_dict_fp32(self.base_model), state_dict_fp32(self.model)
            if self.partner_model is not None:
                self._partner_sd = state_dict_fp32(self.partner_model)
        return self._base_sd, self._tuned_sd

    def load(self, point: Point) -> None:
        """Put the point's weights into the tuned model (the fine-tune's own weights at ``t = 1``)."""
        from ftlab.edits import apply_edit

        base_sd, tuned_sd = self._sds()
        if point.is_tuned:
            self.model.load_state_dict(tuned_sd, strict=False)
            return
        tuned: Any = tuned_sd
        if point.knob == "merge":
            if self._partner_sd is None:
                raise ValueError("a merge point needs a partner model")
            tuned = [tuned_sd, self._partner_sd]
        self.model.load_state_dict(apply_edit(point.edit, base_sd, tuned, **point.settings), strict=False)

    def restore(self) -> None:
        if self._tuned_sd is not None:
            self.model.load_state_dict(self._tuned_sd, strict=False)

    def __call__(self, point: Point) -> tuple[dict[str, SuiteScore], bool]:
        name = point.name(self.arm)
        cached = scores_from_store(self.store, self.run_id, name, self.stage, self.suites)
        if cached is not None:
            return cached, False
        if not point.is_tuned:
            config = {"edit": point.edit, "settings": point.settings, "search": "budget"}
            self.store.add_arm(self.run_id, name, "edit", point.edit, self.arm, config)
        self.load(point)
        try:
            self.run(self.model, self.tokenizer, name, self.stage)
        finally:
            self.restore()
        scores = scores_from_store(self.store, self.run_id, name, self.stage, self.suites)
        if scores is None:
            raise RuntimeError(f"{name}: the runner stored no scores for {', '.join(self.suites)}")
        return scores, True

    def save(self, point: Point, out: str | Path) -> Path:
        """Write the point's model to ``out`` (safetensors, atomically) and restore the tuned weights."""
        from ftlab.models import save_model

        self.load(point)
        try:
            return save_model(self.model, self.tokenizer, out)
        finally:
            self.restore()


def describe(result: SearchResult, arm: str) -> list[str]:
    """Lines for a console: each visit, then the verdict."""
    lines = []
    for i, v in enumerate(result.path, 1):
        ratios = ", ".join(f"{s} {r:.3f}" if r is not None else f"{s} floor" for s, r in v.ratios.items())
        gain = gain_text(v.gain, v.gain_significant)
        mark = "meets" if v.meets else "misses"
        cache = "" if v.fresh else " (cached)"
        lines.append(f"{i}. {v.point.name(arm)}: gain {gain}; {ratios}: {mark}{cache}")
    if result.chosen:
        lines.append(f"chosen: {result.chosen.point.name(arm)} ({result.reason})")
        if result.chosen.gain_significant is False:
            lines.append(GAIN_NOT_SIGNIFICANT)
    else:
        lines.append(f"budget not met: {result.reason}")
    return lines


def run_budget(
    keep: float,
    store: Any,
    run_id: str,
    arm: str,
    stage: int,
    targets: list[str],
    retained: list[str],
    floors: dict[str, float | None],
    confidence: float,
    base_model: Any,
    tuned_model: Any,
    tokenizer: Any,
    run: Callable[[Any, Any, str, int], None],
    out_dir: str | Path,
    *,
    max_evals: int = MAX_EVALS,
    rule: str = "ratio",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The search on one trained arm of a run (``ftlab run`` with ``keep:``): every point stored as a repair point of
    ``arm``, the chosen model written to ``<out_dir>/recommended`` and the record to ``<out_dir>/budget.json`` (both
    atomically, registered as the arm's ``recommended`` and ``budget`` artifacts).

    Returns:
        The record: ``SearchResult.to_dict`` plus ``"arm"`` and ``"model"`` (the recommended folder, or None).
    """
    from ftlab.atomic import write_json

    suites = list(dict.fromkeys(targets + retained))
    base = scores_from_store(store, run_id, "base", 0, suites)
    if base is None:
        raise RuntimeError(f"run {run_id}: the base has no stored scores on {', '.join(suites)}")
    points = ModelPoints(store, run_id, arm, stage, suites, base_model, tuned_model, tokenizer, run)
    result = search(keep, base, targets, retained, points, floors=floors, confidence=confidence, rule=rule,
                    max_evals=max_evals)  # fmt: skip
    out = Path(out_dir)
    record = {"arm": arm, **result.to_dict(arm), "model": None}
    if result.chosen is not None:
        model_dir = out / "recommended"
        points.save(result.chosen.point, model_dir)
        record["model"] = str(model_dir)
        store.add_artifact(run_id, arm, "recommended", str(model_dir))
    write_json(out / "budget.json", record)
    store.add_artifact(run_id, arm, "budget", str(out / "budget.json"))
    for line in describe(result, arm) if log else []:
        log(line)
    return record


def budget_pending(arm_out: str | Path) -> bool:
    """Whether an arm's budget search has not written its record yet (``<arm_out>/budget.json``)."""
    return not (Path(arm_out) / "budget.json").exists()


def run_experiment_budget(
    cfg: Any, keep: float, store: Any, run_id: str, arm: str, ev: Any, model: Any, tokenizer: Any, arm_out: Path,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``ftlab run``'s hook: the search on one trained arm's final model (``keep:`` in the experiment).

    ``cfg`` is the experiment config (its ``base``, ``load``, ``stages`` and ``eval.confidence`` are read), ``ev`` the
    run's evaluator (its ``suites``, ``targets``, ``retained`` and ``run``). The points are stored as repair points of
    the arm at its last stage; see ``run_budget``.
    """
    from ftlab.models import load_model

    targets = [ev.suites[r].name for r in ev.targets]
    retained = [ev.suites[r].name for r in ev.retained]
    floors = {s.name: s.floor for s in ev.suites.values()}
    base_model, _ = load_model(cfg.base, settings=getattr(cfg, "load", None))
    try:
        return run_budget(
            keep, store, run_id, arm, len(cfg.stages), targets, retained, floors, cfg.eval.confidence, base_model,
            model, tokenizer, lambda m, tok, name, stage: ev.run(m, tok, name, stage, split=False), arm_out, log=log,
        )  # fmt: skip
    finally:
        del base_model


__all__ = [
    "KNOBS", "MAX_EVALS", "RULES", "ModelPoints", "Point", "SearchResult", "SuiteScore", "Visit", "beyond_budget",
    "budget_pending", "check_keep", "describe", "judge", "run_budget", "run_experiment_budget", "scores_from_store",
    "search",
]  # fmt: skip
